//! The fuzz corpora (`fuzz/corpus/TARGET/*`, committed) replayed through the fuzz targets' bodies
//! (`fuzz/bodies.rs`) on stable: every input that found new coverage in `scripts/fuzz.sh` runs here
//! in CI, so a parser that regresses on any of them (a panic, an abort) fails the tests.

#[path = "../../fuzz/bodies.rs"]
mod bodies;

#[test]
fn every_committed_fuzz_input_still_passes() {
    let root = distill_e2e::workspace_root().join("fuzz/corpus");
    for (name, body) in bodies::TARGETS {
        let mut inputs = 0;
        for entry in std::fs::read_dir(root.join(name)).unwrap_or_else(|e| panic!("fuzz/corpus/{name}: {e}")) {
            let path = entry.unwrap().path();
            body(&std::fs::read(&path).unwrap());
            inputs += 1;
        }
        assert!(inputs > 0, "fuzz/corpus/{name} is empty");
        eprintln!("{name}: {inputs} inputs");
    }
}
