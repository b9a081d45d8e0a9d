//! With the `cuda` feature: compiles `src/kernels/kernels.cu` to PTX with nvcc (from `NVCC`, `CUDA_ROOT`
//! or the PATH; scripts/cuda-toolkit.sh provides one) for `CUDA_COMPUTE_CAP` (default 80; PTX is
//! compiled on for newer GPUs by the driver). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.ptx");
    let nvcc = std::env::var("NVCC").ok().unwrap_or_else(|| match std::env::var("CUDA_ROOT") {
        Ok(root) if PathBuf::from(&root).join("bin/nvcc").exists() => format!("{root}/bin/nvcc"),
        _ => "nvcc".into(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "src/kernels/kernels.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("{nvcc}: {e} (the cuda feature needs nvcc: source scripts/cuda-toolkit.sh)"));
    assert!(status.success(), "{nvcc} failed on src/kernels/kernels.cu");
}
