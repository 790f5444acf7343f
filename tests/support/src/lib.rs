//! Test support for tasklist-operator, used by `tests/` and by the demo:
//! a real control plane built from Go modules, a real Keycloak, a stand-in Tasklist,
//! and the operator binary run as a child process.

pub mod controlplane;
pub mod image;
pub mod keycloak;
pub mod keys;
pub mod node;
pub mod operator;
pub mod propagation;
pub mod readme;
pub mod registry;
pub mod standin;
pub mod tools;
