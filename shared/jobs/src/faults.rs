//! Fault injection for the tests of panics and crash loops (tests/tests/trust.rs): the service's
//! environment variable `DISTILL_FAILPOINTS=POINT=ACTION[,...]` makes the named point panic
//! (`panic`) or abort the process (`abort`) when a job reaches it. Operators leave it unset; it is
//! read at each point, so an unset variable costs one lookup per job.

/// Where jobs can be made to fail: `job-start` (a job's work begins, in both services).
pub fn hit(point: &str) {
    let Ok(spec) = std::env::var("DISTILL_FAILPOINTS") else {
        return;
    };
    for entry in spec.split(',') {
        match entry.trim().split_once('=') {
            Some((p, "panic")) if p == point => panic!("failpoint {point} (DISTILL_FAILPOINTS)"),
            Some((p, "abort")) if p == point => {
                eprintln!("failpoint {point}: aborting (DISTILL_FAILPOINTS)");
                std::process::abort()
            }
            _ => {}
        }
    }
}
