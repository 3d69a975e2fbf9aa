//! Bench scenario `fare`: a 3-leg quote against a city-sized table. (Issue 3.)

pub fn run(_n: Option<u64>) -> anyhow::Result<crate::Figures> {
    crate::stats::not_yet()
}
