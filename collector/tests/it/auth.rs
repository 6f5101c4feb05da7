//! Agents without a valid token or client certificate are refused.
use std::{path::Path, time::Duration};

use outflow_collector::client::{self, ClientOptions};
use outflow_proto::v1;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_read_tokens_are_apart_and_an_agent_token_is_bound_to_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("data"));
    cfg.auth.agent_tokens_file = Some(write(
        dir.path(),
        "agents",
        "# agent id, token\ngpu-1 tok-one\ngpu-2 tok-two\n",
    ));
    cfg.auth.read_token_file = Some(write(dir.path(), "read", "tok-read\n"));
    let server = start(cfg.clone()).await;
    let u = url(&server);
    let stats = |token: &'static str| {
        let u = u.clone();
        async move {
            let mut req = tonic::Request::new(v1::ClientStatsRequest {
                client: "192.0.2.1".into(),
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            query(&u).await.client_stats(req).await
        }
    };

    // An agent token ingests under its own id...
    let mut a = IngestStream::open(channel(&u).await, Some("tok-one"))
        .await
        .unwrap();
    a.hello(hello("gpu-1", 1, "gpu-1")).await.unwrap();
    let b = batch(1, now_ms(), vec![delta([192, 0, 2, 1], 5, 5, false)]);
    assert_eq!(a.batch(b).await.unwrap(), 1);
    a.close().await;
    // ...and no other.
    let mut a = IngestStream::open(channel(&u).await, Some("tok-two"))
        .await
        .unwrap();
    let e = status(a.hello(hello("gpu-1", 1, "gpu-1")).await.unwrap_err());
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("agent \"gpu-2\"'s"), "{e:?}");
    // An agent token cannot read, the read token cannot ingest.
    let e = stats("tok-one").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = status(
        IngestStream::open(channel(&u).await, Some("tok-read"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = stats("tok-nope").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let r = stats("tok-read").await.unwrap().into_inner();
    assert_eq!(r.windows[0].response_bytes, 5);
    // The alerts are reading too.
    let mut req = tonic::Request::new(v1::ListAlertsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer tok-one".parse().unwrap());
    let e = v1::alerts_client::AlertsClient::new(channel(&u).await)
        .list(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The Hello of another agent, the reads and the ingest: each counted.
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            "outflow_collector_rejects_total{reason=\"permission_denied\"} "
        ),
        4.0,
        "{text}"
    );
    server.shutdown().await.unwrap();

    // A token file others may read is refused, in one line that says what to do.
    let loose = write(dir.path(), "loose", "tok\n");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    cfg.auth.read_token_file = Some(loose.clone());
    let e = outflow_collector::Server::start(cfg).await.err().unwrap();
    let e = e.to_string();
    assert!(
        e.contains("auth.read_token_file")
            && e.contains("mode 0644")
            && e.contains(&format!("chmod 600 {}", loose.display()))
            && !e.contains('\n'),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "token", "s3cret-token\n");
    let mut cfg = config(&dir.path().join("data"));
    cfg.auth.token_file = Some(token_file.clone());
    let server = start(cfg).await;
    let u = url(&server);

    let e = status(
        IngestStream::open(channel(&u).await, None)
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = status(
        IngestStream::open(channel(&u).await, Some("wrong"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client_stats(&u, "1.2.3.4").await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "query without token: {e:?}"
    );

    let mut a = IngestStream::open(channel(&u).await, Some("s3cret-token"))
        .await
        .unwrap();
    a.hello(hello("agent-t", 1, "gpu-t")).await.unwrap();
    assert_eq!(
        a.batch(batch(1, now_ms(), vec![delta([192, 0, 2, 1], 5, 5, false)]))
            .await
            .unwrap(),
        1
    );
    a.close().await;

    // The client library sends the token from a file.
    let mut q = client::query_client(&ClientOptions {
        server: u.clone(),
        token_file: Some(token_file),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = q
        .client_stats(v1::ClientStatsRequest {
            client: "192.0.2.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.windows[0].response_bytes, 5);

    // Health checking stays open.
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(&u).await);
    let s = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "outflow.v1.Ingest".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "outflow_collector_rejects_total{reason=\"unauthenticated\"}"
        ),
        3.0
    );
    server.shutdown().await.unwrap();
}

pub(crate) struct Ca {
    pub(crate) cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub(crate) fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        cert_pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// (cert PEM, key PEM) signed by `ca`.
pub(crate) fn leaf(ca: &Ca, name: &str, server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    if server {
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    }
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes a file only its owner may read (as the collector wants secrets).
pub(crate) fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

async fn tls_channel(
    addr: &str,
    server_ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_certificate_of_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("outflow test server CA");
    let client_ca = ca("outflow test agents CA");
    let rogue_ca = ca("someone else's CA");
    let (scert, skey) = leaf(&server_ca, "localhost", true);
    let good = leaf(&client_ca, "agent-1", false);
    let rogue = leaf(&rogue_ca, "agent-1", false);

    let mtls = |data: &str| {
        let mut cfg = config(&dir.path().join(data));
        cfg.tls.cert = Some(write(dir.path(), "server.crt", &scert));
        cfg.tls.key = Some(write(dir.path(), "server.key", &skey));
        cfg.tls.client_ca = Some(write(dir.path(), "agents-ca.crt", &client_ca.cert_pem));
        cfg
    };
    let server = start(mtls("data")).await;
    let addr = server.addr().to_string();

    // A certificate of the client CA: accepted.
    let ch = tls_channel(&addr, &server_ca.cert_pem, Some(&good))
        .await
        .unwrap();
    let mut a = IngestStream::open(ch, None).await.unwrap();
    a.hello(hello("agent-1", 1, "gpu-1")).await.unwrap();
    assert_eq!(
        a.batch(batch(1, now_ms(), vec![delta([192, 0, 2, 2], 7, 0, false)]))
            .await
            .unwrap(),
        1
    );
    a.close().await;
    // The certificate binds the agent id: agent-1's may not send as agent-2.
    let ch = tls_channel(&addr, &server_ca.cert_pem, Some(&good))
        .await
        .unwrap();
    let mut a = IngestStream::open(ch, None).await.unwrap();
    let e = status(a.hello(hello("agent-2", 1, "gpu-2")).await.unwrap_err());
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("the client certificate names [\"agent-1\"]"),
        "{e:?}"
    );

    // No certificate: UNAUTHENTICATED.
    let ch = tls_channel(&addr, &server_ca.cert_pem, None).await.unwrap();
    let e = status(IngestStream::open(ch, None).await.err().unwrap());
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A certificate of another CA: the handshake fails, nothing gets through.
    let refused = match tls_channel(&addr, &server_ca.cert_pem, Some(&rogue)).await {
        Err(_) => true,
        Ok(ch) => IngestStream::open(ch, None).await.is_err(),
    };
    assert!(refused, "a certificate of a foreign CA was accepted");

    // The CLI's client library speaks mTLS too.
    let opts = ClientOptions {
        server: format!("https://{addr}"),
        ca: Some(write(dir.path(), "server-ca.crt", &server_ca.cert_pem)),
        cert: Some(write(dir.path(), "agent.crt", &good.0)),
        key: Some(write(dir.path(), "agent.key", &good.1)),
        domain: Some("localhost".into()),
        ..Default::default()
    };
    let r = client::query_client(&opts)
        .await
        .unwrap()
        .client_stats(v1::ClientStatsRequest {
            client: "192.0.2.2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.windows[3].response_bytes, 7);
    server.shutdown().await.unwrap();

    // A fleet sharing one certificate: `agent_id_from_cert = false` lets it send as any id.
    let mut cfg = mtls("data2");
    cfg.tls.agent_id_from_cert = false;
    let server = start(cfg).await;
    let addr = server.addr().to_string();
    let ch = tls_channel(&addr, &server_ca.cert_pem, Some(&good))
        .await
        .unwrap();
    let mut a = IngestStream::open(ch, None).await.unwrap();
    a.hello(hello("agent-2", 1, "gpu-2")).await.unwrap();
    a.close().await;
    server.shutdown().await.unwrap();
}
