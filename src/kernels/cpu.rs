//! Which vector instructions the kernels use: the widest level this CPU runs, found once at
//! run time, or a lower one that the environment asks for.
//!
//! Every kernel with vector paths asks here rather than testing the CPU itself, so one
//! setting moves all of them together: AVX-512 (with the AVX512-BF16 and AMX paths of bf16
//! products where the CPU has them), AVX2 with FMA, or the portable code alone. The setting is
//! the environment variable `VASWANI_MAX_ISA`, read once, when a kernel first asks:
//!
//! | value | the kernels use at most |
//! |---|---|
//! | `avx512` (or unset) | everything the CPU has |
//! | `avx2` | AVX2 and FMA: the paths of a CPU without AVX-512 |
//! | `scalar` | the portable code: the paths of a CPU without AVX2 |
//!
//! It measures or tests the paths of a smaller CPU on a larger one, as PyTorch's
//! `ATEN_CPU_CAPABILITY` and oneDNN's `ONEDNN_MAX_CPU_ISA` do for theirs. A level above what
//! the CPU has changes nothing (the CPU's own is used); a value not in the table is ignored,
//! with one line on stderr that says so. Results may differ between levels in the last bits
//! (the kernels of each level sum in their own order), never between thread counts.
//!
//! ```
//! use vaswani::kernels::cpu::{Level, level};
//! // On any machine, the level in use is one of the three.
//! assert!(matches!(level(), Level::Scalar | Level::Avx2 | Level::Avx512));
//! ```

use std::sync::LazyLock;

/// A level of vector instructions, from the portable code up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// No vector kernels of the crate's own (the portable code, as the compiler builds it for
    /// the target).
    Scalar,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512F, with AVX512-BW/VL/BF16 and AMX where the CPU has them (x86-64).
    Avx512,
}

impl Level {
    /// The level's name, as `VASWANI_MAX_ISA` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The level named `name` (case-insensitive), if any.
    pub fn parse(name: &str) -> Option<Level> {
        [Level::Scalar, Level::Avx2, Level::Avx512]
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name.trim()))
    }
}

/// The widest level this CPU runs.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level the kernels use: [`detected`], lowered to `VASWANI_MAX_ISA` if that names a
/// lower one (see the [module docs](self)). The same for the whole process.
///
/// Inlined, so that the kernels' checks of the level are a load and a compare where they
/// run: called, it had been 0.4% of a tiny training step's samples (AMD EPYC Zen 3, from
/// the per-head attention's blocks and the layer norms' rows).
#[inline]
pub fn level() -> Level {
    static LEVEL: LazyLock<Level> = LazyLock::new(|| {
        let cap = match std::env::var("VASWANI_MAX_ISA") {
            Ok(v) => Level::parse(&v).or_else(|| {
                eprintln!("vaswani: VASWANI_MAX_ISA={v:?} is not one of scalar, avx2, avx512; ignored");
                None
            }),
            Err(_) => None,
        };
        let found = detected();
        cap.map_or(found, |c| c.min(found))
    });
    *LEVEL
}

/// Whether the kernels may use AVX-512F (and AVX2 and FMA).
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // asked by the x86 paths
pub(crate) fn avx512() -> bool {
    level() >= Level::Avx512
}

/// Whether the kernels may use AVX2 and FMA.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // asked by the x86 paths
pub(crate) fn avx2() -> bool {
    level() >= Level::Avx2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_levels_are_ordered() {
        for l in [Level::Scalar, Level::Avx2, Level::Avx512] {
            assert_eq!(Level::parse(l.name()), Some(l));
            assert_eq!(Level::parse(&l.name().to_uppercase()), Some(l));
        }
        assert_eq!(Level::parse("avx-512"), None);
        assert!(Level::Scalar < Level::Avx2 && Level::Avx2 < Level::Avx512);
        // The level in use is never above what the CPU has.
        assert!(level() <= detected());
        assert_eq!(avx512(), level() == Level::Avx512);
        assert_eq!(avx2(), level() >= Level::Avx2);
    }
}
