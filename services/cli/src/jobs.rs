//! Showing jobs: tables, details, and a progress bar that follows `WatchJob`.

use crate::client::JobControl;
use clap::Subcommand;
use distill_proto as pb;
use distill_proto::{job_event, Job, JobKind, JobState};
use indicatif::{ProgressBar, ProgressStyle};

pub fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Unspecified => "unspecified",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub fn print_table(jobs: &[Job]) {
    println!("{:<38} {:<10} {:<10} {:>15} {:>10} {:>7}  output", "id", "kind", "state", "done/total", "rows", "shards");
    for j in jobs {
        let p = j.progress.clone().unwrap_or_default();
        let kind = format!("{:?}", j.kind()).to_lowercase();
        println!(
            "{:<38} {:<10} {:<10} {:>15} {:>10} {:>7}  {}",
            j.id,
            kind,
            state_name(j.state()),
            format!("{}/{}", p.done, p.total),
            p.rows,
            p.shards,
            j.output_uri
        );
    }
}

pub fn print_job(j: &Job) {
    let p = j.progress.clone().unwrap_or_default();
    println!("id:        {}", j.id);
    println!("kind:      {}", format!("{:?}", j.kind()).to_lowercase());
    println!("state:     {}", state_name(j.state()));
    if !j.error.is_empty() {
        println!("error:     {}", j.error);
    }
    println!("progress:  {}/{} {} ({} rows, {} shards, {} bytes)", p.done, p.total, p.unit, p.rows, p.shards, p.bytes);
    let mut counters: Vec<_> = p.counters.iter().collect();
    counters.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in counters {
        println!("           {k}: {v}");
    }
    println!("output:    {}", j.output_uri);
    if j.resumes > 0 {
        println!("resumed:   {} time(s) after a restart", j.resumes);
    }
}

/// Follows a job until it ends, with a progress bar; returns its final record.
pub async fn watch(client: &mut impl JobControl, id: &str) -> anyhow::Result<Job> {
    let mut stream = client.watch(id).await?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut ended = false;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(job_event::Event::Progress(p)) => {
                bar.set_length(p.total);
                bar.set_position(p.done);
                let msg = if p.unit == "steps" {
                    let c = |k: &str| p.counters.get(k).copied().unwrap_or(f64::NAN);
                    format!("steps · loss {:.4} · lr {:.2e} · {:.0} pairs/s", c("loss"), c("lr"), c("pairs_per_s"))
                } else if p.unit == "queries" && p.rows == 0 {
                    "queries".to_string()
                } else {
                    format!("{} · {} rows · {} shards", p.unit, p.rows, p.shards)
                };
                bar.set_message(msg);
            }
            Some(job_event::Event::Log(l)) => bar.println(format!("[{}] {}", l.level, l.message)),
            // The training loss is in the bar; evaluations are worth a line.
            Some(job_event::Event::Metric(m)) if m.name != "loss" => {
                bar.println(format!("{} = {:.4} (step {})", m.name, m.value, m.step))
            }
            Some(job_event::Event::Metric(_)) => {}
            Some(job_event::Event::State(s)) if s.state().is_terminal() => {
                ended = true;
                break;
            }
            Some(job_event::Event::State(_)) | None => {}
        }
    }
    bar.finish_and_clear();
    if !ended {
        anyhow::bail!("lost the event stream of job {id}; it goes on in the service: `distill jobs watch {id}`");
    }
    Ok(client.get(id).await?)
}

/// Prints how a job ended; Err for anything but success.
pub fn conclude(job: &Job) -> anyhow::Result<()> {
    let p = job.progress.clone().unwrap_or_default();
    match job.state() {
        JobState::Succeeded => {
            match job.kind() {
                JobKind::Labeling => {
                    println!("job {} succeeded: {} rows in {} shards at {}", job.id, p.rows, p.shards, job.output_uri)
                }
                JobKind::Training => println!(
                    "job {} succeeded: {} steps; checkpoints and exports at {}",
                    job.id, p.done, job.output_uri
                ),
                _ => {
                    let mut metrics: Vec<_> = p.counters.iter().collect();
                    metrics.sort_by(|a, b| a.0.cmp(b.0));
                    for (k, v) in metrics {
                        println!("{k}\t{v:.4}");
                    }
                    println!("job {} succeeded: run and metrics at {}", job.id, job.output_uri)
                }
            }
            Ok(())
        }
        JobState::Failed => anyhow::bail!("job {} failed: {}", job.id, job.error),
        other => anyhow::bail!("job {} ended {}", job.id, state_name(other)),
    }
}

/// Where a job started from the command line writes, its name, and whether to follow it.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Where the job writes (a path or object-store URL); default: in the service's store.
    #[arg(long, default_value = "")]
    pub output: String,
    /// Shown in job lists.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Print the job id and return instead of following the job.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
    },
    Get {
        id: String,
    },
    Watch {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// Queue a FAILED or CANCELLED job again (it continues where it stopped) and follow it.
    Resume {
        id: String,
    },
}

/// Follows a job just started, with a progress bar (or prints its id with --detach).
pub async fn follow(client: &mut impl JobControl, job: pb::Job, what: &str, detach: bool) -> anyhow::Result<()> {
    if detach {
        println!("{}", job.id);
        return Ok(());
    }
    follow_to_end(client, job, what).await.map(drop)
}

/// Follows a job to its end with a progress bar, says how it ended (an error unless it
/// succeeded) and returns its final record.
pub async fn follow_to_end(client: &mut impl JobControl, job: pb::Job, what: &str) -> anyhow::Result<pb::Job> {
    eprintln!("{what}: job {}", job.id);
    let job = watch(client, &job.id).await?;
    conclude(&job)?;
    Ok(job)
}

pub async fn job_command(client: &mut impl JobControl, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List { state } => {
            let state = state.as_deref().map(parse_state).transpose()?.unwrap_or(pb::JobState::Unspecified);
            print_table(&client.list(state).await?);
            Ok(())
        }
        JobsCommand::Get { id } => {
            print_job(&client.get(&id).await?);
            Ok(())
        }
        JobsCommand::Watch { id } => {
            let job = watch(client, &id).await?;
            conclude(&job)
        }
        JobsCommand::Cancel { id } => {
            let job = client.cancel(&id).await?;
            println!("job {}: {}", job.id, state_name(job.state()));
            Ok(())
        }
        JobsCommand::Resume { id } => {
            let job = client.resume(&id).await?;
            eprintln!("job {} resumed (attempt {})", job.id, job.resumes + 1);
            let job = watch(client, &job.id).await?;
            conclude(&job)
        }
    }
}

pub fn parse_state(s: &str) -> anyhow::Result<pb::JobState> {
    Ok(match s {
        "queued" => pb::JobState::Queued,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        other => anyhow::bail!("unknown state '{other}'"),
    })
}
