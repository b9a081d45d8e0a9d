//! Compiles `shared/models/src/kernels/kernels.cu` as C++ against `cpp/cuda_emu.h` (the kernels run on
//! the CPU), with `cpp/races.cu` (racy on purpose, for the sanitizer's test), and writes the table
//! of their kernels, found by their `extern "C" __global__` lines.
//! Each `__shared__` declaration becomes the emulator's shared memory of the running block
//! (`emu::shared`), line for line, so that compiler errors and sanitizer reports name kernels.cu's lines.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=cpp");
    let mut table = String::new();
    for (path, emulated) in [("../models/src/kernels/kernels.cu", "kernels_emu.cu"), ("cpp/races.cu", "races_emu.cu")] {
        println!("cargo:rerun-if-changed={path}");
        let source = std::fs::read_to_string(path).expect(path);
        let mut text = format!("#line 1 \"{path}\"\n");
        for (n, line) in source.lines().enumerate() {
            if let Some(rest) = line.trim_start().strip_prefix("extern \"C\" __global__ void ") {
                // An optional `__launch_bounds__(threads, blocks) ` before the name.
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(b) => b.split_once(") ").map(|(_, r)| r).unwrap_or(b),
                    None => rest,
                };
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                table.push_str(&format!("ENTRY({name})\n"));
            }
            match shared_declaration(line) {
                Some(Ok(decl)) => text.push_str(&decl),
                Some(Err(e)) => panic!("{path}:{}: {e}: {line}", n + 1),
                None => text.push_str(line),
            }
            text.push('\n');
        }
        std::fs::write(out.join(emulated), text).expect(emulated);
    }
    std::fs::write(out.join("table.inc"), table).expect("table.inc");
    // DISTILL_EMU_TSAN=1: the kernels built with ThreadSanitizer, so that the emulated tests report
    // the data races a GPU would have (shared or global memory read and written by two threads,
    // or global memory by two blocks, with no barrier or atomic between them), which the
    // emulator's threads would otherwise only show by chance. The runtime is linked into
    // whatever links this crate; Rust's own code stays uninstrumented (no nightly needed), and
    // the kernels' threads are the only ones that race.
    println!("cargo:rerun-if-env-changed=DISTILL_EMU_TSAN");
    println!("cargo:rustc-check-cfg=cfg(emu_tsan)");
    let tsan = std::env::var("DISTILL_EMU_TSAN").is_ok_and(|v| v == "1");
    let mut build = cc::Build::new();
    if tsan {
        build.flag("-fsanitize=thread").flag("-g").define("DISTILL_EMU_TSAN", None);
        println!("cargo:rustc-link-lib=dylib=tsan");
        println!("cargo:rustc-cfg=emu_tsan");
    }
    // DISTILL_EMU_ASAN=1: the kernels built with AddressSanitizer, so that a read or write past
    // a buffer (the tests size each as the CUDA path allocates it) or past a shared array is
    // reported. The runtime must be loaded first: the tests run with LD_PRELOAD of libasan
    // (scripts/test.sh).
    println!("cargo:rerun-if-env-changed=DISTILL_EMU_ASAN");
    println!("cargo:rustc-check-cfg=cfg(emu_asan)");
    if std::env::var("DISTILL_EMU_ASAN").is_ok_and(|v| v == "1") {
        build.flag("-fsanitize=address").flag("-fno-omit-frame-pointer").flag("-g");
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-cfg=emu_asan");
    }
    // DISTILL_EMU_COVERAGE=1: gcov line counts of the emulated kernels (which lines of kernels.cu
    // the tests run), written next to the object files when the test process exits;
    // scripts/kernel-coverage.sh runs the tests so and prints the lines never run.
    println!("cargo:rerun-if-env-changed=DISTILL_EMU_COVERAGE");
    if std::env::var("DISTILL_EMU_COVERAGE").is_ok_and(|v| v == "1") {
        // Atomic counters: the kernels' threads run at once.
        build.flag("--coverage").flag("-fprofile-update=atomic").flag("-O0");
        // libgcov sits in the compiler's own library folder.
        let compiler = build.get_compiler();
        let lib = std::process::Command::new(compiler.path()).arg("-print-file-name=libgcov.a").output().expect("c++");
        let lib = PathBuf::from(String::from_utf8_lossy(&lib.stdout).trim());
        println!("cargo:rustc-link-search=native={}", lib.parent().expect("libgcov.a's folder").display());
        println!("cargo:rustc-link-lib=static=gcov");
    }
    build
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

/// `__shared__ [__align__(A)] T a[N], b[M][K];` as `auto& a = emu::shared<T[N]>(A); auto& b = ...;`
/// (one line, the indentation kept); None for any other line.
fn shared_declaration(line: &str) -> Option<Result<String, String>> {
    let body = line.trim_start().strip_prefix("__shared__ ")?;
    let indent = &line[..line.len() - line.trim_start().len()];
    Some((|| {
        let (align, body) = match body.strip_prefix("__align__(") {
            Some(r) => {
                let (a, r) = r.split_once(')').ok_or("unclosed __align__")?;
                (a.trim().to_string(), r.trim_start())
            }
            None => ("0".to_string(), body),
        };
        let (ty, decls) = body.split_once(' ').ok_or("no declarator")?;
        let decls = decls.trim_end().strip_suffix(';').ok_or("not one declaration on one line")?;
        // Declarators split at the commas outside brackets (a dimension may hold `Stage<D, R>::size`).
        let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
        for (i, c) in decls.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&decls[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&decls[start..]);
        let mut out = String::from(indent);
        for part in parts {
            let part = part.trim();
            let name_len = part.find('[').ok_or("a shared declaration that is not an array")?;
            let (name, dims) = part.split_at(name_len);
            out.push_str(&format!("auto& {name} = emu::shared<{ty}{dims}>({align}); "));
        }
        Ok(out.trim_end().to_string())
    })())
}
