//! The control plane is real enough for the operator's tests: garbage collection follows
//! ownerReferences, RBAC denies a fresh service account, and the API server can be restarted.
//! Needs the `TLO_*` variables (see `hack/tools.sh`); fails without them.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use testsupport::controlplane::ControlPlane;
use testsupport::tools::Tools;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_collects_garbage_enforces_rbac_and_survives_restart() -> anyhow::Result<()> {
    let tools = Tools::from_env()?;
    let mut control_plane = ControlPlane::start(&tools).await?;
    let namespace = control_plane.create_namespace("gc").await?;
    assert!(namespace.starts_with("gc-"), "{namespace}");

    // An owner and a dependent; deleting the owner must make the garbage collector delete the dependent.
    let config_maps = Api::<ConfigMap>::namespaced(control_plane.client(), &namespace);
    let owner = config_maps.create(&PostParams::default(), &config_map("owner", None)).await?;
    let owner_reference = OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().context("the owner has no uid")?,
        ..Default::default()
    };
    config_maps
        .create(&PostParams::default(), &config_map("dependent", Some(owner_reference)))
        .await?;
    config_maps.delete("owner", &DeleteParams::background()).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while config_maps.get_opt("dependent").await?.is_some() {
        if Instant::now() > deadline {
            bail!(
                "the garbage collector did not delete the dependent\n{}",
                control_plane.logs_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A fresh service account authenticates but may not read secrets.
    let kubeconfig = control_plane.service_account_kubeconfig(&namespace, "nobody").await?;
    let config = Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig)?, &KubeConfigOptions::default()).await?;
    let as_service_account = Client::try_from(config)?;
    match Api::<Secret>::all(as_service_account).list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            let user = format!("system:serviceaccount:{namespace}:nobody");
            assert!(status.message.contains(&user), "403 for another user: {}", status.message);
        }
        other => bail!("a fresh service account listed secrets cluster-wide: {other:?}"),
    }

    // An outage: requests fail while the API server is down and work again after it restarts.
    control_plane.stop_apiserver().await?;
    assert!(
        config_maps.list(&ListParams::default()).await.is_err(),
        "the API server answered while stopped"
    );
    control_plane.start_apiserver().await?;
    let after_restart = Api::<ConfigMap>::namespaced(control_plane.client(), &namespace);
    after_restart
        .list(&ListParams::default())
        .await
        .context("listing after the API server restarted")?;
    // The client made before the outage reconnects to the same address.
    config_maps
        .list(&ListParams::default())
        .await
        .context("listing with the pre-outage client")?;
    Ok(())
}

fn config_map(name: &str, owner: Option<OwnerReference>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: owner.map(|owner| vec![owner]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Shared fixtures live in statics or `Arc`s used by many test threads.
#[test]
fn fixtures_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ControlPlane>();
    shareable::<testsupport::keycloak::Keycloak>();
    shareable::<testsupport::operator::OperatorProcess>();
}
