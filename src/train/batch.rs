//! Batching by a token budget (and padding, [`pad_batch`](crate::models::batch::pad_batch),
//! which lives with the batches it builds).
//!
//! The paper batches "sentence pairs together by approximate sequence length. Each training
//! batch contained a set of sentence pairs containing approximately 25000 source tokens and
//! 25000 target tokens" (§5.1). [`token_batches`] does that: sequences sorted by length are
//! cut into batches whose padded size, `count × longest`, stays within the budget, so short
//! sequences travel in large batches and long ones in small batches, and little is padding.

use crate::error::{Error, Result};

/// Groups sequence indices into batches of similar length whose padded size
/// (`count × longest`) is at most `max_tokens`; a sequence longer than the budget travels
/// alone. Indices are sorted by length (ties by index), so the result is deterministic;
/// shuffle the batch order yourself if you want.
///
/// # Errors
/// [`Error::InvalidConfig`] if `max_tokens` is 0.
pub fn token_batches(lengths: &[usize], max_tokens: usize) -> Result<Vec<Vec<usize>>> {
    if max_tokens == 0 {
        return Err(Error::config("max_tokens", "must be at least 1, got 0"));
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so the newest sequence is the longest of its batch.
        let longest = lengths[i].max(1);
        if !current.is_empty() && (current.len() + 1) * longest > max_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::batch::pad_batch;
    use ndarray::array;

    #[test]
    fn pads_to_the_longest() {
        let (ids, lens) = pad_batch(&[vec![5, 6, 7], vec![8]], 0).unwrap();
        assert_eq!(ids, array![[5, 6, 7], [8, 0, 0]]);
        assert_eq!(lens, vec![3, 1]);
        assert!(pad_batch::<Vec<usize>>(&[], 0).is_err());
    }

    #[test]
    fn token_budget_is_respected_and_every_index_appears_once() {
        let lengths = [3, 10, 4, 4, 9, 1, 30, 2, 8, 8];
        let batches = token_batches(&lengths, 20).unwrap();
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() * longest <= 20 || b.len() == 1, "{b:?}");
        }
        // Short sequences share big batches, the 30-token one is alone.
        assert!(batches.iter().any(|b| b == &vec![6]));
        assert!(batches[0].len() >= 4);
        assert!(token_batches(&lengths, 0).is_err());
    }
}
