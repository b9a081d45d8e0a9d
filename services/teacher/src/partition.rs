//! Scale-out labelling: which queries a partitioned job labels, where its part is written, and
//! committing the whole dataset once every part is (see `distill_shards::parts`).

use crate::candidates::QueryCandidates;
use crate::error::Error;
use distill_jobs::{JobEntry, Jobs};
use distill_proto::LabelingSpec;
use distill_shards::parts::{self, MAX_PARTS};
use distill_store::Location;

/// Part `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: u32,
    pub count: u32,
}

impl Part {
    /// The spec's part; `None` for a whole (unpartitioned) job. INVALID_ARGUMENT naming the field
    /// for a count above [`MAX_PARTS`] or an index outside the count.
    pub fn of(spec: &LabelingSpec) -> Result<Option<Part>, Error> {
        let Some(p) = spec.partition else { return Ok(None) };
        if p.count == 0 {
            return Ok(None);
        }
        if p.count > MAX_PARTS {
            return Err(Error::InvalidArgument(format!("partition.count: {} is above the bound {MAX_PARTS}", p.count)));
        }
        if p.index >= p.count {
            return Err(Error::InvalidArgument(format!(
                "partition.index: {} is not below partition.count {}",
                p.index, p.count
            )));
        }
        Ok(Some(Part { index: p.index, count: p.count }))
    }

    /// Where this part's own dataset is written, below the whole's `output`.
    pub fn output(&self, output: &Location) -> Location {
        output.child(&parts::part_dir(self.index, self.count))
    }

    /// The queries of this part, in source order.
    pub fn select(&self, queries: Vec<QueryCandidates>) -> Vec<QueryCandidates> {
        queries.into_iter().filter(|q| parts::part_of(&q.qid, self.count) == self.index).collect()
    }

    /// After this part committed: commits the whole dataset at `output` if every part has,
    /// while this replica still holds the job. Logs which it was.
    pub async fn finish(&self, output: &Location, jobs: &Jobs, entry: &JobEntry) -> Result<(), Error> {
        jobs.confirm(entry).await?;
        let message = match parts::commit_parts(output, self.count).await? {
            Some(whole) => format!(
                "all {} parts are committed: the dataset at {} is ({} rows in {} shards)",
                self.count,
                output.uri(),
                whole.rows,
                whole.shards.len()
            ),
            None => format!(
                "part {} of {} committed; the part that completes the set commits the dataset",
                self.index, self.count
            ),
        };
        jobs.log(entry, "info", message);
        Ok(())
    }
}
