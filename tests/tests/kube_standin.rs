//! The Kubernetes API-server stand-in, checked with the real `kube::Client`: if these
//! pass, product code written against kube-rs sees the semantics it would see from a
//! real API server (for the parts we use).

use std::time::Duration;

use e2e::kube_api::KubeApi;
use e2e::kube_api::meta;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use tokio_stream::StreamExt;

async fn client(api: &KubeApi) -> kube::Client {
    e2e::install_crypto();
    let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_selectors_conflicts_and_pagination() {
    let api = KubeApi::start().await;
    let c = client(&api).await;
    let namespaces: Api<Namespace> = Api::all(c.clone());
    let pp = PostParams::default();
    let ns = Namespace {
        metadata: meta("shop", &[("ca.istio.io/env", "istio-system")]),
        ..Default::default()
    };
    namespaces.create(&pp, &ns).await.unwrap();
    assert_eq!(code(namespaces.create(&pp, &ns).await.unwrap_err()), 409);
    namespaces
        .create(
            &pp,
            &Namespace {
                metadata: meta("kube-system", &[]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let selected = namespaces
        .list(&ListParams::default().labels("ca.istio.io/env=istio-system"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    assert_eq!(
        namespaces
            .list(&ListParams::default().labels("ca.istio.io/env!=istio-system"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), "shop");
    sas.create(
        &pp,
        &ServiceAccount {
            metadata: meta("cart", &[]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        Api::<ServiceAccount>::all(c.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let secrets: Api<Secret> = Api::namespaced(c.clone(), "shop");
    assert_eq!(code(secrets.get("istio.cart").await.unwrap_err()), 404);
    let created = secrets
        .create(
            &pp,
            &Secret {
                metadata: meta("istio.cart", &[]),
                type_: Some("istio.io/key-and-cert".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let mut newer = created.clone();
    newer.type_ = Some("Opaque".into());
    let updated = secrets.replace("istio.cart", &pp, &newer).await.unwrap();
    assert_ne!(
        updated.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    // A write based on the old version is a conflict.
    assert_eq!(
        code(
            secrets
                .replace("istio.cart", &pp, &created)
                .await
                .unwrap_err()
        ),
        409
    );
    let patched = secrets
        .patch(
            "istio.cart",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.annotations.unwrap()["a"], "b");
    secrets
        .delete("istio.cart", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        code(
            secrets
                .delete("istio.cart", &DeleteParams::default())
                .await
                .unwrap_err()
        ),
        404
    );
    let w = api.writes();
    assert_eq!(w.of("Secret"), 4, "create, update, patch, delete: {w:?}");

    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "shop");
    for i in 0..5 {
        cms.create(
            &pp,
            &ConfigMap {
                metadata: meta(&format!("cm{i}"), &[]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    let rest = cms
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 3);

    api.fail_next(1);
    assert_eq!(code(cms.get("cm0").await.unwrap_err()), 500);
    cms.get("cm0").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_resume_bookmark_drop_and_expire() {
    let api = KubeApi::start().await;
    let c = client(&api).await;
    let pp = PostParams::default();
    Api::<Namespace>::all(c.clone())
        .create(
            &pp,
            &Namespace {
                metadata: meta("shop", &[]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(c.clone(), "shop");
    let list = secrets.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();

    let stream = secrets
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    secrets
        .create(
            &pp,
            &Secret {
                metadata: meta("s1", &[]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    secrets
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut last_rv = rv.clone();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event")
            .expect("open")
            .unwrap()
        {
            WatchEvent::Added(s) => {
                last_rv = s.metadata.resource_version.clone().unwrap();
                seen.push("ADDED");
            }
            WatchEvent::Deleted(s) => {
                last_rv = s.metadata.resource_version.clone().unwrap();
                seen.push("DELETED");
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["ADDED", "DELETED"]);
    // A bookmark arrives while idle.
    let bookmark = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("bookmark")
        .unwrap()
        .unwrap();
    assert!(matches!(bookmark, WatchEvent::Bookmark(_)), "{bookmark:?}");

    // Dropped by the server: the stream ends; resuming from the last version misses nothing.
    api.drop_watches();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(e) = stream.next().await {
            if !matches!(e, Ok(WatchEvent::Bookmark(_))) {
                return false;
            }
        }
        true
    })
    .await
    .expect("the watch ends");
    assert!(ended);
    secrets
        .create(
            &pp,
            &Secret {
                metadata: meta("s2", &[]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let resumed = secrets
        .watch(&WatchParams::default().timeout(30), &last_rv)
        .await
        .unwrap();
    let mut resumed = std::pin::pin!(resumed);
    match tokio::time::timeout(Duration::from_secs(5), resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(s) => assert_eq!(s.metadata.name.as_deref(), Some("s2")),
        other => panic!("{other:?}"),
    }

    // After compaction an old version is Gone.
    api.compact();
    let old = secrets
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap();
    let mut old = std::pin::pin!(old);
    match tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}
