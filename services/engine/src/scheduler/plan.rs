//! The prefill plan: which prefill chunks run in an iteration, and in which forward calls.

use crate::layers::gemm::SMALL_M;

/// Which prefill chunks run this iteration, and how they are grouped into forward calls.
/// `prefilling` gives, oldest first, each prefilling entry's key and prompt tokens left.
///
/// Each prompt is cut into chunks of `chunk` tokens whatever else runs. The oldest chunk always
/// runs; younger ones join while their tokens fit in a budget of `chunk` tokens, so several
/// short prompts arriving together all get their first token before the next decode step,
/// while running streams never wait for more than one chunk's worth of prompt. The groups
/// follow `Gpt2::kernel`, which picks each chunk's kernel from its own length: chunks of at
/// most [`SMALL_M`] tokens (small-batch kernel) share one call while their rows fit in
/// [`SMALL_M`], then start another; longer chunks (`sgemm`) share one call with `shared`
/// ([`Gpt2::shared_prefill`]) and are each their own call without. Groups come in order of
/// their oldest entry; each lists its keys in the order given.
///
/// [`Gpt2::shared_prefill`]: crate::model::Gpt2::shared_prefill
pub(super) fn prefill_plan<K>(
    prefilling: impl Iterator<Item = (K, usize)>,
    chunk: usize,
    shared: bool,
) -> Vec<Vec<K>> {
    let mut budget = chunk;
    let mut groups: Vec<Vec<K>> = Vec::new();
    // The open group of short chunks (its index and rows), and the shared `sgemm` group.
    let mut small: Option<(usize, usize)> = None;
    let mut long: Option<usize> = None;
    for (i, remaining) in prefilling {
        let tokens = remaining.min(chunk);
        if !groups.is_empty() && tokens > budget {
            break;
        }
        budget = budget.saturating_sub(tokens);
        if tokens <= SMALL_M {
            match &mut small {
                Some((g, rows)) if *rows + tokens <= SMALL_M => {
                    groups[*g].push(i);
                    *rows += tokens;
                }
                _ => {
                    small = Some((groups.len(), tokens));
                    groups.push(vec![i]);
                }
            }
        } else {
            match long {
                Some(g) if shared => groups[g].push(i),
                _ => {
                    long = shared.then_some(groups.len());
                    groups.push(vec![i]);
                }
            }
        }
        if budget == 0 {
            break;
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::prefill_plan;

    fn plan(prefilling: &[(usize, usize)], shared: bool) -> Vec<Vec<usize>> {
        prefill_plan(prefilling.iter().copied(), 256, shared)
    }

    #[test]
    fn short_prompts_share_one_call_while_their_rows_fit() {
        let eight: Vec<(usize, usize)> = (0..8).map(|i| (i, 4)).collect();
        assert_eq!(plan(&eight, false), vec![(0..8).collect::<Vec<_>>()]);
        // 30 + 2 rows fit in one small-batch call; the next 30 start another.
        assert_eq!(plan(&[(0, 30), (1, 2), (2, 30), (3, 1)], false), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn long_prompts_share_one_call_within_the_budget_when_allowed() {
        let eight: Vec<(usize, usize)> = (0..8).map(|i| (i, 33)).collect();
        assert_eq!(plan(&eight, true), vec![(0..7).collect::<Vec<_>>()], "7 · 33 ≤ 256 < 8 · 33");
        assert_eq!(plan(&[(0, 40), (2, 40), (5, 40)], false), vec![vec![0], vec![2], vec![5]]);
    }

    #[test]
    fn short_and_long_chunks_never_share_a_call() {
        assert_eq!(
            plan(&[(0, 1), (1, 40), (3, 1), (4, 50), (5, 5)], true),
            vec![vec![0, 3, 5], vec![1, 4]]
        );
    }

    #[test]
    fn the_oldest_chunk_always_runs_and_long_prompts_are_cut() {
        assert_eq!(
            plan(&[(3, 1000), (4, 2)], true),
            vec![vec![3]],
            "a full chunk fills the budget"
        );
        assert_eq!(plan(&[(0, 300), (1, 10)], true), vec![vec![0]]);
        assert_eq!(
            plan(&[(0, 250), (1, 10), (2, 6)], true),
            vec![vec![0]],
            "the first chunk that does not fit ends the plan, so no prompt overtakes an older one"
        );
    }
}
