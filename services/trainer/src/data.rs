//! The training data stream: committed datasets read shard by shard (one shard of read-ahead),
//! rows turned into score groups, shuffled through a bounded buffer, cut into micro-batches and
//! tokenized on a producer thread, so the training thread only runs the model.
//!
//! The order is a pure function of (datasets, seed, epoch): the shuffle buffer's generator is
//! seeded per epoch, so a position `(epoch, groups consumed)` is all a checkpoint needs to resume
//! the same stream (the epoch is replayed and the consumed groups skipped).

use crate::objectives::DatasetFields;
use crate::teacher_link::TeacherJob;
use crate::Error;
use candle_core::{Device, Tensor};
use distill_models::tokenize::PairTokenizer;
use distill_shards::{DatasetReader, GrowingDataset, Layout, ListRow, NextShard, TripleRow};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One query's group of passages; slot 0 is the positive where the objective needs one.
#[derive(Debug, Clone)]
pub struct Group {
    pub query: String,
    pub passages: Vec<String>,
    pub labels: Vec<f32>,
    pub teacher_scores: Vec<f32>,
    pub teacher_ranks: Vec<f32>,
}

/// A tokenized micro-batch of `groups` groups of `width` slots (CPU tensors).
pub struct Batch {
    pub groups: usize,
    pub width: usize,
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
    /// [groups, width]: 1 real, 0 padding.
    pub mask: Tensor,
    pub labels: Tensor,
    pub teacher_scores: Option<Tensor>,
    pub teacher_ranks: Option<Tensor>,
    /// Position after this batch.
    pub epoch: u64,
    pub consumed: u64,
}

impl Batch {
    /// The same batch on `device` (batches are built on the CPU by the producer thread).
    pub fn to_device(self, device: &Device) -> candle_core::Result<Batch> {
        if device.is_cpu() {
            return Ok(self);
        }
        let opt = |t: Option<Tensor>| t.map(|t| t.to_device(device)).transpose();
        Ok(Batch {
            input_ids: self.input_ids.to_device(device)?,
            token_type_ids: self.token_type_ids.to_device(device)?,
            attention_mask: self.attention_mask.to_device(device)?,
            mask: self.mask.to_device(device)?,
            labels: self.labels.to_device(device)?,
            teacher_scores: opt(self.teacher_scores)?,
            teacher_ranks: opt(self.teacher_ranks)?,
            ..self
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct Position {
    pub epoch: u64,
    /// Groups of this epoch already trained on.
    pub consumed: u64,
}

/// What the datasets hold, read from their first rows, and how many groups an epoch has.
pub struct DataSummary {
    pub fields: DatasetFields,
    pub rows: u64,
}

pub async fn open_datasets(uris: &[String]) -> Result<Vec<DatasetReader>, Error> {
    if uris.is_empty() {
        return Err(Error::InvalidArgument("datasets: at least one committed dataset URI is required".into()));
    }
    let mut readers = Vec::with_capacity(uris.len());
    for uri in uris {
        let r = DatasetReader::open_uri(uri).await.map_err(|e| Error::InvalidArgument(format!("datasets: {e}")))?;
        readers.push(r);
    }
    let layout = readers[0].manifest().layout;
    if let Some(other) = readers.iter().find(|r| r.manifest().layout != layout) {
        return Err(Error::InvalidArgument(format!(
            "datasets: {} is {} but {} is {}",
            uris[0],
            layout.name(),
            other.location().uri(),
            other.manifest().layout.name()
        )));
    }
    Ok(readers)
}

/// The fields the datasets offer, judged from the first batch of rows of each.
pub async fn summarize(readers: &[DatasetReader]) -> Result<DataSummary, Error> {
    let lists = readers[0].manifest().layout == Layout::Lists;
    let mut fields = DatasetFields { lists, labels: !lists, teacher_scores: true, teacher_ranks: lists };
    let mut rows = 0;
    for r in readers {
        rows += r.manifest().rows;
        let Some(batch) = r.batches(256).next().await else {
            continue;
        };
        let batch = batch?;
        if lists {
            let rows =
                ListRow::from_batch(&batch).map_err(|e| Error::InvalidInput(format!("{}: {e}", r.location().uri())))?;
            fields.labels |= rows.iter().any(|r| r.items.iter().any(|i| i.label.is_some()));
        } else {
            let rows = TripleRow::from_batch(&batch)
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", r.location().uri())))?;
            fields.teacher_scores &= rows.iter().all(|t| t.pos_score.is_some() && t.neg_score.is_some());
        }
    }
    Ok(DataSummary { fields, rows })
}

/// How rows become groups.
#[derive(Debug, Clone, Copy)]
pub struct GroupOptions {
    pub group_size: usize,
    /// Lists: the positive (slot 0) is the item of the highest label (the teacher's order breaks
    /// ties), and the other judged-relevant items are left out of the group (they are not
    /// negatives); lists without a relevant item are skipped. Otherwise slot 0 is the teacher's first.
    pub positive_from_labels: bool,
}

fn triple_group(t: TripleRow) -> Group {
    let scores = match (t.pos_score, t.neg_score) {
        (Some(p), Some(n)) => vec![p as f32, n as f32],
        _ => vec![],
    };
    let ranks = if scores.len() == 2 {
        if scores[0] >= scores[1] {
            vec![1.0, 2.0]
        } else {
            vec![2.0, 1.0]
        }
    } else {
        vec![]
    };
    Group {
        query: t.query,
        passages: vec![t.pos_text, t.neg_text],
        labels: vec![t.pos_label.unwrap_or(1).max(1) as f32, t.neg_label.unwrap_or(0) as f32],
        teacher_scores: scores,
        teacher_ranks: ranks,
    }
}

fn list_group(mut l: ListRow, opts: GroupOptions, tokenizer: Option<&PairTokenizer>) -> Result<Option<Group>, Error> {
    l.items.sort_by_key(|i| i.teacher_rank);
    if opts.positive_from_labels {
        let Some(best) = l.items.iter().map(|i| i.label.unwrap_or(0)).max().filter(|&b| b > 0) else {
            return Ok(None);
        };
        let Some(at) = l.items.iter().position(|i| i.label.unwrap_or(0) == best) else { return Ok(None) };
        let pos = l.items.remove(at);
        l.items.retain(|i| i.label.unwrap_or(0) <= 0);
        l.items.insert(0, pos);
    }
    let width = opts.group_size.max(2);
    let items = match tokenizer {
        Some(tok) => distinct_inputs(tok, &l.query, l.items, |i| &i.text, width)?,
        None => l.items.into_iter().take(width).collect(),
    };
    Ok(Some(Group {
        query: l.query,
        passages: items.iter().map(|i| i.text.clone()).collect(),
        labels: items.iter().map(|i| i.label.unwrap_or(0) as f32).collect(),
        teacher_scores: items.iter().map(|i| i.teacher_score as f32).collect(),
        teacher_ranks: items.iter().map(|i| i.teacher_rank as f32).collect(),
    }))
}

/// The first `keep` items, in order, whose student input differs from every earlier item's: the
/// same token ids once cut to the max length means the same score, so a passage that differs from
/// the positive only past the cut (near-duplicate descriptions, boilerplate prefixes) or not at all
/// is a negative the student cannot tell apart, a target it cannot meet. Such items are skipped
/// and the next candidates take their place.
fn distinct_inputs<T>(
    tokenizer: &PairTokenizer,
    query: &str,
    items: Vec<T>,
    text: impl Fn(&T) -> &str,
    keep: usize,
) -> Result<Vec<T>, Error> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(keep);
    for item in items {
        if out.len() == keep {
            break;
        }
        let (ids, _) = tokenizer.encode_pair(query, text(&item))?;
        if seen.insert(ids) {
            out.push(item);
        }
    }
    Ok(out)
}

/// Stream settings.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    pub batch_size: usize,
    pub shuffle_buffer: usize,
    pub seed: u64,
    pub groups: GroupOptions,
    /// Stop after this many epochs (None: forever).
    pub epochs: Option<u64>,
}

fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x5851_F42D_4C95_7F2D))
}

/// Where groups come from: committed datasets, or the dataset of a labelling job still running.
pub enum Source {
    Committed(DatasetReader),
    Growing { data: GrowingDataset, layout: Layout, teacher: TeacherJob },
}

/// Stops the producer thread when dropped (training ended, failed or was cancelled).
pub struct ProducerGuard(Arc<AtomicBool>);

impl Drop for ProducerGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs the producer on its own thread: it sends tokenized batches (at most `capacity` waiting)
/// starting at `start`, until the epochs end, the guard is dropped, or an error (sent last).
pub fn spawn_producer(
    sources: Vec<Source>,
    tokenizer: PairTokenizer,
    opts: StreamOptions,
    start: Position,
    capacity: usize,
) -> (std::sync::mpsc::Receiver<Result<Batch, Error>>, ProducerGuard) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    let handle = tokio::runtime::Handle::current();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = Producer { handle, tokenizer, opts, tx, stop: stop.clone() };
    std::thread::Builder::new()
        .name("distill-data".into())
        .spawn(move || {
            if let Err(e) = producer.run(&sources, start) {
                let _ = producer.tx.send(Err(e));
            }
        })
        .expect("spawn data thread");
    (rx, ProducerGuard(stop))
}

/// The receiver went away or the guard was dropped: stop quietly.
struct Closed;

struct Producer {
    handle: tokio::runtime::Handle,
    tokenizer: PairTokenizer,
    opts: StreamOptions,
    tx: std::sync::mpsc::SyncSender<Result<Batch, Error>>,
    stop: Arc<AtomicBool>,
}

/// One epoch's shuffle buffer and the batch being filled.
struct Epoch {
    epoch: u64,
    skip: u64,
    rng: ChaCha8Rng,
    buffer: Vec<Group>,
    pending: Vec<Group>,
    consumed: u64,
    seen: bool,
    /// Triples skipped because their two inputs are the same (`distinct_inputs`).
    indistinct: u64,
}

enum Flow {
    Go,
    Stop,
}

impl Producer {
    fn run(&self, sources: &[Source], start: Position) -> Result<(), Error> {
        let (mut epoch, mut skip) = (start.epoch, start.consumed);
        loop {
            if self.opts.epochs.is_some_and(|n| epoch >= n) {
                return Ok(());
            }
            let mut e = Epoch {
                epoch,
                skip,
                rng: epoch_rng(self.opts.seed, epoch),
                buffer: Vec::with_capacity(self.opts.shuffle_buffer.max(1)),
                pending: Vec::new(),
                consumed: 0,
                seen: false,
                indistinct: 0,
            };
            for source in sources {
                if let Flow::Stop = self.read_source(source, &mut e)? {
                    return Ok(());
                }
            }
            while !e.buffer.is_empty() {
                let j = e.rng.random_range(0..e.buffer.len());
                let out = e.buffer.swap_remove(j);
                if self.emit(out, &mut e).is_err() {
                    return Ok(());
                }
            }
            if !e.seen {
                let why = if e.indistinct > 0 {
                    format!(
                        ": every one of the {} triples has a negative whose input, once tokenized and cut to max_length \
                         {}, is its positive's (a tokenizer that maps the texts to the same ids, or a max_length too short)",
                        e.indistinct,
                        self.tokenizer.max_length
                    )
                } else {
                    String::new()
                };
                return Err(Error::InvalidInput(format!("the datasets hold no usable groups{why}")));
            }
            // A partial last batch is dropped, as drop_last does.
            epoch += 1;
            skip = 0;
        }
    }

    fn read_source(&self, source: &Source, e: &mut Epoch) -> Result<Flow, Error> {
        match source {
            Source::Committed(reader) => {
                let uri = reader.location().uri().to_string();
                let mut batches = reader.batches(512);
                while let Some(rb) = self.handle.block_on(batches.next()) {
                    if let Flow::Stop = self.rows(&rb?, reader.manifest().layout, &uri, e)? {
                        return Ok(Flow::Stop);
                    }
                }
            }
            Source::Growing { data, layout, teacher } => {
                let loc = data.location();
                let mut seq = 0;
                loop {
                    if self.stop.load(Ordering::Relaxed) {
                        return Ok(Flow::Stop);
                    }
                    match self.handle.block_on(data.shard(seq))? {
                        NextShard::Ready(info) => {
                            let bytes = self.handle.block_on(distill_shards::reader::fetch_verified(loc, &info))?;
                            for rb in distill_shards::reader::decode(loc, &info, bytes, *layout, 512)? {
                                if let Flow::Stop = self.rows(&rb?, *layout, &loc.uri_of(&info.path), e)? {
                                    return Ok(Flow::Stop);
                                }
                            }
                            seq += 1;
                        }
                        NextShard::End => break,
                        NextShard::Pending => {
                            self.handle.block_on(teacher.check_alive())?;
                            std::thread::sleep(std::time::Duration::from_millis(300));
                        }
                    }
                }
            }
        }
        Ok(Flow::Go)
    }

    /// Turns a record batch into groups and feeds them through the shuffle buffer.
    fn rows(&self, rb: &arrow::array::RecordBatch, layout: Layout, uri: &str, e: &mut Epoch) -> Result<Flow, Error> {
        let groups: Vec<Group> = match layout {
            Layout::Triples => TripleRow::from_batch(rb)
                .map_err(|m| Error::InvalidInput(format!("{uri}: {m}")))?
                .into_iter()
                .filter_map(|t| {
                    // A negative the student cannot tell from the positive (same input once cut
                    // to the max length): no signal, skipped (see `distinct_inputs`).
                    match distinct_inputs(&self.tokenizer, &t.query, vec![&t.pos_text, &t.neg_text], |s| s.as_str(), 2)
                    {
                        Ok(v) if v.len() < 2 => {
                            e.indistinct += 1;
                            None
                        }
                        Ok(_) => Some(Ok(triple_group(t))),
                        Err(e) => Some(Err(e)),
                    }
                })
                .collect::<Result<_, _>>()?,
            Layout::Lists => ListRow::from_batch(rb)
                .map_err(|m| Error::InvalidInput(format!("{uri}: {m}")))?
                .into_iter()
                .filter_map(|l| list_group(l, self.opts.groups, Some(&self.tokenizer)).transpose())
                .collect::<Result<_, _>>()?,
        };
        for g in groups {
            e.seen = true;
            if e.buffer.len() < self.opts.shuffle_buffer.max(1) {
                e.buffer.push(g);
                continue;
            }
            let j = e.rng.random_range(0..e.buffer.len());
            let out = std::mem::replace(&mut e.buffer[j], g);
            if self.emit(out, e).is_err() {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Go)
    }

    /// Emits groups in order; the first `skip` of the epoch are dropped (already trained on).
    fn emit(&self, g: Group, e: &mut Epoch) -> Result<(), Closed> {
        e.consumed += 1;
        if e.consumed <= e.skip {
            return Ok(());
        }
        e.pending.push(g);
        if e.pending.len() == self.opts.batch_size {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Closed);
            }
            let groups = std::mem::take(&mut e.pending);
            let batch = tokenize(&self.tokenizer, &groups, e.epoch, e.consumed).map_err(|err| {
                let _ = self.tx.send(Err(err));
                Closed
            })?;
            self.tx.send(Ok(batch)).map_err(|_| Closed)?;
        }
        Ok(())
    }
}

fn tokenize(tokenizer: &PairTokenizer, groups: &[Group], epoch: u64, consumed: u64) -> Result<Batch, Error> {
    let width = groups.iter().map(|g| g.passages.len()).max().unwrap_or(0);
    let cpu = Device::Cpu;
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(groups.len() * width);
    let (mut mask, mut labels, mut scores, mut ranks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let has_scores = groups.iter().all(|g| g.teacher_scores.len() == g.passages.len());
    let has_ranks = groups.iter().all(|g| g.teacher_ranks.len() == g.passages.len());
    for g in groups {
        for k in 0..width {
            let real = k < g.passages.len();
            // Padding slots repeat the first passage (masked out of every loss).
            pairs.push((g.query.as_str(), g.passages[if real { k } else { 0 }].as_str()));
            mask.push(real as u8 as f32);
            labels.push(if real { g.labels[k] } else { 0.0 });
            scores.push(if real && has_scores { g.teacher_scores[k] } else { 0.0 });
            ranks.push(if real && has_ranks { g.teacher_ranks[k] } else { 0.0 });
        }
    }
    let enc = tokenizer.batch(&pairs, &cpu)?;
    let shape = (groups.len(), width);
    Ok(Batch {
        groups: groups.len(),
        width,
        input_ids: enc.input_ids,
        token_type_ids: enc.token_type_ids,
        attention_mask: enc.attention_mask,
        mask: Tensor::from_vec(mask, shape, &cpu)?,
        labels: Tensor::from_vec(labels, shape, &cpu)?,
        teacher_scores: if has_scores { Some(Tensor::from_vec(scores, shape, &cpu)?) } else { None },
        teacher_ranks: if has_ranks { Some(Tensor::from_vec(ranks, shape, &cpu)?) } else { None },
        epoch,
        consumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_shards::ListItem;

    fn item(doc: &str, rank: i32, label: Option<i32>) -> ListItem {
        ListItem {
            doc_id: doc.into(),
            text: doc.into(),
            teacher_score: -rank as f64,
            teacher_rank: rank,
            label,
            member_scores: None,
        }
    }

    #[test]
    fn list_groups_take_the_best_judged_item_and_no_relevant_negatives() {
        let row = ListRow {
            query_id: "q".into(),
            query: "q".into(),
            items: vec![
                item("n1", 1, Some(0)),
                item("sib", 2, Some(1)),
                item("n2", 3, None),
                item("known", 4, Some(2)),
                item("n3", 5, Some(0)),
            ],
        };
        let opts = GroupOptions { group_size: 8, positive_from_labels: true };
        let g = list_group(row.clone(), opts, None).unwrap().unwrap();
        assert_eq!(g.passages, ["known", "n1", "n2", "n3"]);
        assert_eq!(g.labels, [2.0, 0.0, 0.0, 0.0]);
        assert_eq!(g.teacher_ranks, [4.0, 1.0, 3.0, 5.0]);
        // group_size cuts the negatives in teacher order.
        let g =
            list_group(row.clone(), GroupOptions { group_size: 2, positive_from_labels: true }, None).unwrap().unwrap();
        assert_eq!(g.passages, ["known", "n1"]);
        // Without labels the teacher's first is the positive and everything else follows.
        let g = list_group(row.clone(), GroupOptions { group_size: 8, positive_from_labels: false }, None)
            .unwrap()
            .unwrap();
        assert_eq!(g.passages, ["n1", "sib", "n2", "known", "n3"]);
        // No relevant item: skipped.
        let none = ListRow { items: vec![item("a", 1, Some(0)), item("b", 2, None)], ..row };
        assert!(list_group(none, opts, None).unwrap().is_none());
    }

    #[test]
    fn negatives_the_student_cannot_tell_from_the_positive_are_skipped() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models/tests/fixtures/bert/tokenizer.json");
        // 16 tokens: [CLS] query [SEP] passage [SEP] leaves the passage 16 - 3 - 2 = 11 tokens.
        let tok = PairTokenizer::from_file(&fixture, 32, 16, None).unwrap();
        let long = "the large data and the store for the large data and the store";
        let text = |t: &str, rank: i32, label: Option<i32>| ListItem {
            text: t.into(),
            ..item(&format!("d{rank}"), rank, label)
        };
        let row = ListRow {
            query_id: "q".into(),
            query: "a b".into(),
            items: vec![
                text(&format!("{long} of the game"), 1, None), // the positive's first 11 tokens
                text("the game store", 2, None),
                text(&format!("{long} for data"), 3, Some(2)), // the positive
                text("the game store", 4, None),               // the same as rank 2
                text("a different text", 5, None),
                text("one more text", 6, None),
            ],
        };
        let opts = GroupOptions { group_size: 3, positive_from_labels: true };
        let (a, _) = tok.encode_pair("a b", &row.items[0].text).unwrap();
        let (b, _) = tok.encode_pair("a b", &row.items[2].text).unwrap();
        assert_eq!(a, b, "the fixture must make ranks 1 and 3 the same input");
        let g = list_group(row.clone(), opts, Some(&tok)).unwrap().unwrap();
        // Rank 1 (the positive's input) and rank 4 (rank 2's) are skipped; the next candidates fill the group.
        assert_eq!(g.teacher_ranks, [3.0, 2.0, 5.0]);
        let g = list_group(row.clone(), GroupOptions { group_size: 8, ..opts }, Some(&tok)).unwrap().unwrap();
        assert_eq!(g.teacher_ranks, [3.0, 2.0, 5.0, 6.0]);
        // Without the tokenizer (no cut known) only the order and the size apply.
        let g = list_group(row, opts, None).unwrap().unwrap();
        assert_eq!(g.teacher_ranks, [3.0, 1.0, 2.0]);
    }
}
