//! The prefill plan: which prefill chunks run in an iteration, and in which forward calls.

/// Which prefill chunks run this iteration, and how they are grouped into forward calls.
/// `prefilling` gives, oldest first, each prefilling entry's key and prompt tokens left.
///
/// Each prompt is cut into chunks of `chunk` tokens whatever else runs. The oldest chunk always
/// runs; younger ones join while their tokens fit in a budget of `chunk` tokens, so several
/// short prompts arriving together all get their first token before the next decode step,
/// while running streams never wait for more than one chunk's worth of prompt. With `shared`
/// ([`Gpt2::shared_prefill`]) the chunks of two or more tokens form one group (one `sgemm` per
/// weight matrix); single-token chunks, whose rows take the small-batch kernel, and every
/// chunk without `shared`, are groups of their own. Groups come in order of their oldest
/// entry; each lists its keys in the order given.
pub(super) fn prefill_plan<K>(
    prefilling: impl Iterator<Item = (K, usize)>,
    chunk: usize,
    shared: bool,
) -> Vec<Vec<K>> {
    let mut budget = chunk;
    let mut groups: Vec<Vec<K>> = Vec::new();
    let mut together: Option<usize> = None;
    for (i, remaining) in prefilling {
        let tokens = remaining.min(chunk);
        if !groups.is_empty() && tokens > budget {
            break;
        }
        budget = budget.saturating_sub(tokens);
        let shareable = shared && tokens >= 2;
        match together {
            Some(g) if shareable => groups[g].push(i),
            _ => {
                if shareable {
                    together = Some(groups.len());
                }
                groups.push(vec![i]);
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
    fn short_prompts_share_one_call_within_the_budget() {
        let eight: Vec<(usize, usize)> = (0..8).map(|i| (i, 32)).collect();
        assert_eq!(plan(&eight, true), vec![(0..8).collect::<Vec<_>>()]);
        let nine: Vec<(usize, usize)> = (0..9).map(|i| (i, 32)).collect();
        assert_eq!(plan(&nine, true), vec![(0..8).collect::<Vec<_>>()], "the ninth waits");
    }

    #[test]
    fn without_sharing_each_chunk_is_its_own_call() {
        assert_eq!(plan(&[(0, 32), (2, 32), (5, 10)], false), vec![vec![0], vec![2], vec![5]]);
    }

    #[test]
    fn single_token_chunks_run_alone() {
        assert_eq!(
            plan(&[(0, 1), (1, 40), (3, 1), (4, 5)], true),
            vec![vec![0], vec![1, 4], vec![3]]
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
