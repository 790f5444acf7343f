//! End-to-end tests: the operator binary against a real kube-apiserver, etcd and
//! kube-controller-manager (garbage collection included), a real Keycloak and a stand-in
//! Tasklist. One control plane and one Keycloak serve every scenario; each scenario has
//! its own namespace, stand-in Tasklist and operator process.
//!
//! A missing component fails every scenario: nothing is skipped.
//!
//! How to run one scenario and how to add one: `tests/README.md`.

/// The scenarios of one module, each named `module::function`:
/// `scenarios![core: saas_token_reaches_ready, restart_reuses_the_stored_credential]`.
/// Used inside the module, as the body of its `pub fn scenarios()`.
macro_rules! scenarios {
    ($module:ident: $($scenario:ident),+ $(,)?) => {
        vec![$({
            let run: crate::ScenarioFn = |world| Box::pin($scenario(world));
            (concat!(stringify!($module), "::", stringify!($scenario)), run)
        }),+]
    };
}

mod admission;
mod auth_methods;
mod chart;
mod core;
mod ha;
mod isolation;
mod nudge;
mod observability;
mod policy;
mod probes;
mod refresh;
mod reliability;
mod scale;
mod scenario;
mod secret_template;
mod secretless;
mod shards;
mod sharing;
mod trust;
mod versions;
mod writes;

use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};
use scenario::World;

type ScenarioFn = fn(Arc<World>) -> futures::future::BoxFuture<'static, anyhow::Result<()>>;

fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    let mut all = core::scenarios();
    all.extend(chart::scenarios());
    all.extend(ha::scenarios());
    all.extend(reliability::scenarios());
    all.extend(observability::scenarios());
    all.extend(refresh::scenarios());
    all.extend(policy::scenarios());
    all.extend(isolation::scenarios());
    all.extend(auth_methods::scenarios());
    all.extend(secretless::scenarios());
    all.extend(writes::scenarios());
    all.extend(shards::scenarios());
    all.extend(probes::scenarios());
    all.extend(scale::scenarios());
    all.extend(sharing::scenarios());
    all.extend(trust::scenarios());
    all.extend(admission::scenarios());
    all.extend(versions::scenarios());
    all.extend(secret_template::scenarios());
    all.extend(nudge::scenarios());
    all
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // Scenarios mostly wait on servers and timers; run several at once.
    args.test_threads.get_or_insert(4);
    let list = scenarios();
    if args.list {
        let trials = list.into_iter().map(|(name, _)| Trial::test(name, || Ok(()))).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    // Started on the main thread: child processes die with the thread that spawned them.
    let world = World::start().map(Arc::new).map_err(|error| format!("{error:#}"));
    let trials = list
        .into_iter()
        .map(|(name, scenario)| {
            let world = world.clone();
            Trial::test(name, move || {
                let world = world.map_err(|error| Failed::from(format!("the test environment did not start: {error}")))?;
                world.run(name, scenario(world.clone())).map_err(Failed::from)
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(world);
    conclusion.exit_code()
}
