//! Compiles `shared/models/src/kernels/kernels.cu` as C++ against `cpp/cuda_emu.h` (the kernels run on
//! the CPU) and writes the table of its kernels, found by their `extern "C" __global__` lines.

use std::path::PathBuf;

fn main() {
    let kernels = PathBuf::from("../models/src/kernels/kernels.cu");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed=cpp");
    let source = std::fs::read_to_string(&kernels).expect("../models/src/kernels/kernels.cu");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut table = String::new();
    for line in source.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("extern \"C\" __global__ void ") {
            // An optional `__launch_bounds__(threads, blocks) ` before the name.
            let rest = match rest.strip_prefix("__launch_bounds__(") {
                Some(b) => b.split_once(") ").map(|(_, r)| r).unwrap_or(b),
                None => rest,
            };
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            table.push_str(&format!("ENTRY({name})\n"));
        }
    }
    std::fs::write(out.join("table.inc"), table).expect("table.inc");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include("cpp")
        .include("../models/src/kernels")
        .include(&out)
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(1)
        .file("cpp/emu.cpp")
        .compile("distill_cuda_emu");
}
