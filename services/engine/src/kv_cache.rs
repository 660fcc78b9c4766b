//! The KV cache of one sequence: per layer, K and V for up to `capacity` positions,
//! preallocated and written in place (never grown by concatenation).

use ndarray::{Array2, ArrayView2, s};

use crate::config::ModelConfig;

/// Keys and values of one sequence. Rows `[0, len)` hold the positions seen so far; the forward
/// pass writes a step's rows at `[len, len + S)` and `advance`s once every layer is
/// done.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer `(capacity, C)`.
    k: Vec<Array2<f32>>,
    /// Per layer `(capacity, C)`.
    v: Vec<Array2<f32>>,
    len: usize,
}

impl KvCache {
    /// A zeroed cache for `capacity` positions. The zeroed memory comes from the allocator as
    /// untouched pages, so a large cache costs resident memory only as it fills.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Self {
        let layer = || Array2::zeros((capacity, cfg.n_embd));
        Self {
            k: (0..cfg.n_layer).map(|_| layer()).collect(),
            v: (0..cfg.n_layer).map(|_| layer()).collect(),
            len: 0,
        }
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.k.first().map_or(0, Array2::nrows)
    }

    /// Forgets every position so the cache can serve another sequence. Old rows are not
    /// cleared: reads never go past `len`.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Writes a step's keys and values `(S, C)` of `layer` at rows `[len, len + S)`.
    pub(crate) fn write(&mut self, layer: usize, k: ArrayView2<'_, f32>, v: ArrayView2<'_, f32>) {
        let rows = s![self.len..self.len + k.nrows(), ..];
        self.k[layer].slice_mut(rows).assign(&k);
        self.v[layer].slice_mut(rows).assign(&v);
    }

    /// Keys and values of `layer` for rows `[0, upto)`.
    pub(crate) fn view(
        &self,
        layer: usize,
        upto: usize,
    ) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
        (self.k[layer].slice(s![..upto, ..]), self.v[layer].slice(s![..upto, ..]))
    }

    /// Marks `n` more positions as filled.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// All stored keys of `layer`, filled or not (for tests and the dump tool).
    pub fn keys(&self, layer: usize) -> ArrayView2<'_, f32> {
        self.k[layer].view()
    }

    /// All stored values of `layer`, filled or not.
    pub fn values(&self, layer: usize) -> ArrayView2<'_, f32> {
        self.v[layer].view()
    }
}
