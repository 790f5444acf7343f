//! Node tests: the operator the way users install it. The README's commands build the image
//! from the Dockerfile with buildah (`make image`) and push it and the chart to a private
//! registry (TLS, password); the chart, installed from `oci://`, runs as Pods on a real
//! kubelet that pulls the image with a pull secret, next to an application Pod that reads
//! the derived Secret from a mounted volume.
//!
//! One control plane, one registry and one node (containerd, kubelet, kube-proxy,
//! kube-scheduler) serve every scenario; each scenario has its own namespace, helm release
//! and stand-in Tasklist.
//! The whole test process runs in a network namespace of its own (see
//! `testsupport::node`): nothing it starts can reach beyond this machine.
//!
//! Needs root. A missing component fails every scenario: nothing is skipped.

mod consumer;
mod scenarios;
mod world;

use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // The scenarios mostly wait (for the kubelet, for token lifetimes); the consumer runs for
    // minutes, so all of them run at once and the others finish while it measures.
    args.test_threads.get_or_insert(4);
    let list = scenarios::all();
    if args.list {
        let trials = list.into_iter().map(|(name, _)| Trial::test(name, || Ok(()))).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    // Before any thread exists: namespaces are per thread, and threads inherit them.
    let world = testsupport::node::enter_private_namespaces()
        .and_then(|()| world::World::start())
        .map(Arc::new)
        .map_err(|error| format!("{error:#}"));
    let trials = list
        .into_iter()
        .map(|(name, scenario)| {
            let world = world.clone();
            Trial::test(name, move || {
                let world = world.map_err(|error| Failed::from(format!("the node test environment did not start: {error}")))?;
                world.run(name, scenario(world.clone())).map_err(Failed::from)
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Ok(world) = &world {
        world.print_figures();
    }
    drop(world);
    conclusion.exit_code()
}
