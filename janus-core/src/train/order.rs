//! The order samples are taken in. Without a mix, every sample once an epoch, in a seeded
//! shuffle, a new one each epoch (the file's own proportions of tasks). With a mix `G:U:T`, each
//! draw first picks a task — generation, understanding (single or multi-turn), text — with
//! those weights, then that task's next sample from its own seeded shuffle (so each task's
//! samples come round in turn, and a task with few samples repeats more often).

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::Rng;
use serde_json::{Value, json};

use super::data::Example;
use super::trainer::uniform;
use crate::error::{Error, Result};
use crate::generate::sampling::stream;

/// The task groups a mix weighs, in the mix's order.
const TASKS: [&str; 3] = ["generate", "understand", "text"];

/// Sample indices in a seeded order (see the module documentation).
pub(crate) struct Order {
    rng: ChaCha8Rng,
    /// Each group's current shuffle of its members and the next place in it.
    groups: Vec<Group>,
    /// Cumulative weights of the groups (empty: one group of every sample).
    cumulative: Vec<f64>,
}

struct Group {
    order: Vec<usize>,
    at: usize,
}

impl Order {
    /// The order of `examples` under `mix` (weights of generation, understanding and text
    /// samples), seeded with `seed`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the mix weighs a task the samples do not have.
    pub(crate) fn new(examples: &[Example], mix: Option<[f64; 3]>, seed: u64) -> Result<Self> {
        let (groups, cumulative) = match mix {
            None => (vec![(0..examples.len()).collect::<Vec<_>>()], Vec::new()),
            Some(weights) => {
                let mut groups = Vec::new();
                let mut cumulative = Vec::new();
                let total: f64 = weights.iter().sum();
                let mut sum = 0.0;
                for (task, w) in TASKS.iter().zip(weights) {
                    if w == 0.0 {
                        continue;
                    }
                    let members: Vec<usize> = examples
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.task() == *task)
                        .map(|(i, _)| i)
                        .collect();
                    if members.is_empty() {
                        return Err(Error::InvalidInput(format!(
                            "the mix gives {task} samples weight {w}, but the data has none"
                        )));
                    }
                    sum += w / total;
                    groups.push(members);
                    cumulative.push(sum);
                }
                (groups, cumulative)
            }
        };
        Ok(Order {
            rng: stream(seed, 0),
            groups: groups
                .into_iter()
                .map(|order| Group {
                    at: order.len(),
                    order,
                })
                .collect(),
            cumulative,
        })
    }

    /// The next sample's index.
    pub(crate) fn next(&mut self) -> usize {
        let g = if self.cumulative.is_empty() {
            0
        } else {
            let u = uniform(&mut self.rng);
            self.cumulative
                .iter()
                .position(|&c| u < c)
                .unwrap_or(self.cumulative.len() - 1)
        };
        let group = &mut self.groups[g];
        if group.at == group.order.len() {
            // Fisher–Yates.
            for i in (1..group.order.len()).rev() {
                let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
                group.order.swap(i, j);
            }
            group.at = 0;
        }
        group.at += 1;
        group.order[group.at - 1]
    }

    /// The order's state, as a checkpoint keeps it.
    pub(crate) fn state(&self) -> Value {
        json!({
            "groups": self.groups.iter().map(|g| &g.order).collect::<Vec<_>>(),
            "at": self.groups.iter().map(|g| g.at).collect::<Vec<_>>(),
            "word_pos": self.rng.get_word_pos().to_string(),
        })
    }

    /// Takes up a state [`state`](Self::state) gave, for the same samples and mix.
    ///
    /// # Errors
    /// A description of what does not fit.
    pub(crate) fn restore(&mut self, state: &Value) -> std::result::Result<(), String> {
        let groups: Vec<Vec<usize>> =
            serde_json::from_value(state["groups"].clone()).map_err(|e| e.to_string())?;
        let at: Vec<usize> =
            serde_json::from_value(state["at"].clone()).map_err(|e| e.to_string())?;
        let pos: u128 = state["word_pos"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("no word position")?;
        if groups.len() != self.groups.len() || at.len() != groups.len() {
            return Err("another number of sample groups".into());
        }
        for ((g, order), at) in self.groups.iter_mut().zip(groups).zip(at) {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            let mut mine = g.order.clone();
            mine.sort_unstable();
            if sorted != mine || at > order.len() {
                return Err("the order does not fit the samples".into());
            }
            g.order = order;
            g.at = at;
        }
        self.rng.set_word_pos(pos);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Example> {
        let text = |t: &str| Example::Text { text: t.into() };
        let generate = Example::Generate {
            prompt: "p".into(),
            image: "x.png".into(),
        };
        vec![
            text("a"),
            generate.clone(),
            text("b"),
            text("c"),
            generate,
            text("d"),
            text("e"),
        ]
    }

    #[test]
    fn each_epoch_takes_every_sample_once_in_a_seeded_order() {
        let epochs = |seed| {
            let mut o = Order::new(&samples(), None, seed).unwrap();
            (0..21).map(|_| o.next()).collect::<Vec<_>>()
        };
        let a = epochs(3);
        for epoch in a.chunks(7) {
            let mut e = epoch.to_vec();
            e.sort_unstable();
            assert_eq!(e, (0..7).collect::<Vec<_>>());
        }
        assert_eq!(a, epochs(3));
        assert_ne!(a, epochs(4));
        assert_ne!(a[..7], a[7..14]);
    }

    #[test]
    fn a_mix_weighs_the_tasks() {
        let examples = samples();
        let mut o = Order::new(&examples, Some([1.0, 0.0, 1.0]), 5).unwrap();
        let draws: Vec<usize> = (0..4000).map(|_| o.next()).collect();
        let generate = draws
            .iter()
            .filter(|&&i| examples[i].task() == "generate")
            .count();
        // Half the draws (2 of 7 samples without the mix), within a few standard deviations.
        assert!((1850..=2150).contains(&generate), "{generate}");
        // Each task's samples come round in turn.
        let gens: Vec<usize> = draws
            .iter()
            .copied()
            .filter(|&i| examples[i].task() == "generate")
            .collect();
        for pair in gens.chunks(2) {
            if pair.len() == 2 {
                assert_ne!(pair[0], pair[1]);
            }
        }
        let only_text = Order::new(&examples, Some([0.0, 0.0, 2.0]), 5);
        let mut only_text = only_text.unwrap();
        assert!((0..50).all(|_| examples[only_text.next()].task() == "text"));
        assert!(Order::new(&examples, Some([0.0, 1.0, 0.0]), 5).is_err());
    }

    #[test]
    fn a_restored_order_goes_on_the_same() {
        let examples = samples();
        for mix in [None, Some([1.0, 0.0, 3.0])] {
            let mut a = Order::new(&examples, mix, 9).unwrap();
            for _ in 0..10 {
                a.next();
            }
            let mut b = Order::new(&examples, mix, 9).unwrap();
            b.restore(&a.state()).unwrap();
            let (x, y): (Vec<usize>, Vec<usize>) = (0..30).map(|_| (a.next(), b.next())).unzip();
            assert_eq!(x, y);
        }
        let mut c = Order::new(&examples, None, 9).unwrap();
        let other = Order::new(&examples, Some([1.0, 0.0, 1.0]), 9).unwrap();
        assert!(c.restore(&other.state()).is_err());
    }
}
