//! (query, passage) pair encoding with the model's own template, from `tokenizer.json`.
//!
//! The query is cut to `max_query_length` tokens, then the passage so that the whole pair with its
//! special tokens fits `max_length` (the passage is truncated first, as HF's `only_second`).
//! Padding and truncation settings stored in the file are ignored: batches are padded to their
//! longest pair.

use crate::{ModelError, Result};
use candle_core::{Device, Tensor};
use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

#[derive(Clone)]
pub struct PairTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    pub max_query_length: usize,
    pub max_length: usize,
    specials: usize,
}

/// A padded batch, ready for a model.
pub struct EncodedBatch {
    /// [B, L] u32
    pub input_ids: Tensor,
    /// [B, L] u32
    pub token_type_ids: Tensor,
    /// [B, L] f32, 1 for tokens, 0 for padding
    pub attention_mask: Tensor,
}

fn tk(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl PairTokenizer {
    pub fn from_file(
        path: &std::path::Path,
        max_query_length: usize,
        max_length: usize,
        pad_id: Option<u32>,
    ) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::Invalid {
            path: path.display().to_string(),
            message: format!("not a tokenizer.json: {e}"),
        })?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tk)?;
        let specials = inner.get_post_processor().map_or(0, |p| p.added_tokens(true));
        let pad_id = pad_id.or_else(|| ["[PAD]", "<pad>"].iter().find_map(|t| inner.token_to_id(t))).unwrap_or(0);
        Ok(Self { inner, pad_id, max_query_length, max_length, specials })
    }

    /// Token ids and token type ids of one pair.
    pub fn encode_pair(&self, query: &str, passage: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut q = self.inner.encode(query, false).map_err(tk)?;
        q.truncate(self.max_query_length, 0, TruncationDirection::Right);
        let mut p = self.inner.encode(passage, false).map_err(tk)?;
        let room = self.max_length.saturating_sub(self.specials + q.get_ids().len());
        p.truncate(room, 0, TruncationDirection::Right);
        let pair = self.inner.post_process(q, Some(p), true).map_err(tk)?;
        Ok((pair.get_ids().to_vec(), pair.get_type_ids().to_vec()))
    }

    /// Token ids and token type ids of one text alone (bi-encoders), cut to `max_length` with its
    /// special tokens.
    pub fn encode_single(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut t = self.inner.encode(text, false).map_err(tk)?;
        let specials = self.inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        t.truncate(self.max_length.saturating_sub(specials), 0, TruncationDirection::Right);
        let one = self.inner.post_process(t, None, true).map_err(tk)?;
        Ok((one.get_ids().to_vec(), one.get_type_ids().to_vec()))
    }

    /// Encodes pairs and pads them to the longest.
    pub fn batch(&self, pairs: &[(&str, &str)], device: &Device) -> Result<EncodedBatch> {
        let encoded: Vec<_> = pairs.iter().map(|(q, p)| self.encode_pair(q, p)).collect::<Result<_>>()?;
        self.pad(encoded.iter(), device)
    }

    /// Pads encoded pairs (`encode_pair`'s output) to the longest of them.
    pub fn pad<'a>(
        &self,
        encoded: impl ExactSizeIterator<Item = &'a (Vec<u32>, Vec<u32>)> + Clone,
        device: &Device,
    ) -> Result<EncodedBatch> {
        let rows = encoded.len();
        let width = encoded.clone().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (i, t) in encoded {
            ids.extend(i.iter().copied().chain(std::iter::repeat(self.pad_id)).take(width));
            types.extend(t.iter().copied().chain(std::iter::repeat(0)).take(width));
            mask.extend((0..width).map(|k| if k < i.len() { 1f32 } else { 0.0 }));
        }
        let shape = (rows, width);
        Ok(EncodedBatch {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            token_type_ids: Tensor::from_vec(types, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
        })
    }
}
