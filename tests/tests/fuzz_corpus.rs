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

/// A small seeded generator (xorshift64*): the mutation run below is the same on every machine
/// for one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that tend to break parsers: boundaries of integer widths, separators, UTF-8 lead bytes.
const INTERESTING: &[u8] =
    &[0, 1, 0x7f, 0x80, 0xff, b'\t', b'\n', b'\r', b' ', b'-', b'.', b'e', b'"', b'{', 0xc3, 0xf0];

/// One to four random edits of `input` (bit flips, interesting bytes, inserts, deletions,
/// duplicated runs, a splice with `other`), as libFuzzer's default mutators do.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        let byte = at.min(data.len().saturating_sub(1));
        match rng.below(6) {
            0 if !data.is_empty() => data[byte] ^= 1 << rng.below(8),
            1 if !data.is_empty() => data[byte] = INTERESTING[rng.below(INTERESTING.len())],
            2 => data.splice(at..at, (0..1 + rng.below(8)).map(|_| rng.next() as u8)).for_each(drop),
            3 => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at.min(end)..end);
            }
            4 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                let run = data[at.min(end)..end].to_vec();
                data.splice(at..at, run).for_each(drop);
            }
            _ => {
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

/// A short fuzzing run in CI on stable (the long runs use cargo-fuzz: `scripts/fuzz.sh`): each
/// target's corpus mutated for `DISTILL_FUZZ_SECONDS` (default 2) per target, seeded by
/// `DISTILL_FUZZ_SEED` (default: the day, printed). A panic fails the test and leaves the input in
/// `target/fuzz-crash-TARGET` for `cargo fuzz run TARGET FILE`.
#[test]
fn mutated_corpus_inputs_do_not_panic() {
    let seconds: f64 = std::env::var("DISTILL_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let seed: u64 = std::env::var("DISTILL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(day);
    eprintln!("mutation seed {seed} (DISTILL_FUZZ_SEED={seed} repeats it)");
    let root = distill_e2e::workspace_root();
    for (name, body) in bodies::TARGETS {
        let corpus: Vec<Vec<u8>> = std::fs::read_dir(root.join("fuzz/corpus").join(name))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ name.len() as u64 | 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
        let mut runs = 0u64;
        while std::time::Instant::now() < deadline {
            let (a, b) = (&corpus[rng.below(corpus.len())], &corpus[rng.below(corpus.len())]);
            let input = mutate(&mut rng, a, b);
            if std::panic::catch_unwind(|| body(&input)).is_err() {
                let path = root.join(format!("target/fuzz-crash-{name}"));
                std::fs::write(&path, &input).unwrap();
                panic!("{name} panicked on a mutated input (seed {seed}), saved as {}", path.display());
            }
            runs += 1;
        }
        eprintln!("{name}: {runs} mutated inputs, no panic");
    }
}
