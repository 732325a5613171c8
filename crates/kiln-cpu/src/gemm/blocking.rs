//! Cache blocking: the sizes `MC`, `KC`, `NC` of the BLIS loops, derived from this machine's
//! cache sizes and the microkernel's `MR × NR`.
//!
//! * `KC`: each `MR × NR` tile of C is loaded and stored once per depth block, so `KC` sets
//!   how much arithmetic amortises that traffic. It is the larger of two sizes: one packed B
//!   micro-panel (`KC × NR` f32) in half of L1d, or in 3/32 of L2 (the microkernel then
//!   streams it from L2, which keeps up). Measured on a Zen 5 core (48 KiB L1d, 1 MiB L2) with the
//!   AVX-512 kernel: KC = 192 (the L1 rule) reached 72–80 % of peak at 1024–4096, KC = 768 and
//!   1024 84–89 % (see docs/gemm.md); with the AVX2 kernel both gave the same rate. On a Zen 3
//!   core (512 KiB L2, AVX2) KC = 768 beat 1024 (an eighth of L2) by 4–7 % at 2048³ and 4096³,
//!   hence 3/32: 768 on both, 1024 (the clamp) where L2 per NR column is larger.
//! * `MC`: one packed A block (`MC × KC` f32) about fills L2 (rounded up to a multiple of MR).
//! * The deep general nest, for kernels of `NR ≥ 32` (the AVX-512 `12 × 32`) whose B micro-panel
//!   is past the L1 rule anyway: `KC` puts the B micro-panel in a quarter of L2 (2048 on a
//!   1 MiB L2), `MC × KC` is four times L2 and `KC × NC` all of the last-level cache (`MC = 516`,
//!   `NC = 4096` there). The A block then streams from L3 while the one B micro-panel of a
//!   column of tiles stays in L2 for `MC / MR` calls; half as many depth blocks halve the C-tile
//!   traffic, and the wide `NC` packs each A block once per depth block instead of per 2720
//!   columns (`pack_a` was 3.7 % of 4096³ with `NC = 1024`). A B block past L3 costs little:
//!   each micro-panel is read once per A block. Measured on a Zen 5 core against `KC = 768`,
//!   `MC = 348`, `NC = 2720`, interleaved runs (medians, GFLOP/s; `MC` 516 or 528): 4096³
//!   221.7 → 236.8 and 223.7 → 233.0 on one thread, 437.6 → 458.4 and 392 → 414 on two; 2048³
//!   231.8 → 242.0 and 193.6 → 218.6 on one, 448.2 → 457.4 on two; `MC` 264 (A in twice L2) and
//!   `NC` 1024–2048 measured between the two. On the Zen 3 core the AVX2 kernel (NR = 16) lost 4–7 % at
//!   deeper blocks, so it keeps the rules above.
//! * `NC` (L2 rules): one packed B block (`KC × NC` f32) fills about a quarter of the last-level
//!   cache (it is shared by every thread, and by other processes).
//! * The small-M nest (all of M in one A block) keeps the L2 rules (`small_kc`, `small_mc`) with
//!   every kernel, and its `slab`: a `small_kc × slab·NR` B slab about fills L2.
use std::sync::OnceLock;

/// Data-cache sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    pub l1d: usize,
    pub l2: usize,
    pub l3: usize,
}

impl CacheSizes {
    /// Used when the OS does not tell: a common x86 server core.
    pub const FALLBACK: CacheSizes = CacheSizes {
        l1d: 32 << 10,
        l2: 1 << 20,
        l3: 16 << 20,
    };

    /// The caches of cpu0, read once from `/sys/devices/system/cpu/cpu0/cache/index*/`; any
    /// level that cannot be read keeps its [`CacheSizes::FALLBACK`] value.
    pub fn detect() -> CacheSizes {
        static SIZES: OnceLock<CacheSizes> = OnceLock::new();
        *SIZES.get_or_init(|| read_sysfs().unwrap_or(CacheSizes::FALLBACK))
    }
}

fn read_sysfs() -> Option<CacheSizes> {
    let mut sizes = CacheSizes::FALLBACK;
    let mut found = false;
    for idx in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{idx}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let Some(bytes) = parse_size(size.trim()) else {
            continue;
        };
        let kind = kind.trim();
        match (level.trim(), kind) {
            ("1", "Data") | ("1", "Unified") => sizes.l1d = bytes,
            ("2", "Unified") | ("2", "Data") => sizes.l2 = bytes,
            ("3", "Unified") => sizes.l3 = bytes,
            _ => continue,
        }
        found = true;
    }
    found.then_some(sizes)
}

/// Parses `32K`, `2048K`, `32M`, `1G` or a plain byte count.
fn parse_size(s: &str) -> Option<usize> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mult)
}

/// Loop sizes of one BLIS GEMM: `mc` rows of A per packed block, `kc` depth per packed panel,
/// `nc` columns of B per packed block (the general loop nest); `mc` is a multiple of MR and `nc`
/// of NR. The small-M loop nest has its own depth and A-block budget (`small_kc`,
/// `small_mc`) and its slab of B panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    pub mc: usize,
    pub kc: usize,
    pub nc: usize,
    /// Rows of the small-M nest's one A block (a multiple of MR): `small_mc × small_kc` f32
    /// about fill L2.
    pub small_mc: usize,
    /// Depth per block of the small-M nest.
    pub small_kc: usize,
    /// NR panels per packed B slab on the small-M path (`m ≤ small_mc`): a `small_kc × slab·NR`
    /// slab takes about the size of L2 (measured: smaller slabs alternate packing and arithmetic
    /// too often).
    pub slab: usize,
}

impl Blocking {
    /// The blocking for an `mr × nr` microkernel on caches `cs` (see the module comment).
    pub fn for_kernel(mr: usize, nr: usize, cs: CacheSizes) -> Blocking {
        let f = std::mem::size_of::<f32>();
        let l1_rule = cs.l1d / 2 / (nr * f);
        let l2_rule = cs.l2 * 3 / 32 / (nr * f);
        let small_kc = l1_rule.max(l2_rule).clamp(64, 1024) / 8 * 8;
        let small_mc = (cs.l2 / (small_kc * f))
            .clamp(mr, 1024)
            .next_multiple_of(mr);
        let (kc, mc, b_block) = if nr >= DEEP_NR && l1_rule < small_kc {
            let kc = (cs.l2 / 4 / (nr * f)).clamp(small_kc, 2048) / 8 * 8;
            let mc = (4 * cs.l2 / (kc * f)).clamp(mr, 1024).next_multiple_of(mr);
            (kc, mc, cs.l3)
        } else {
            (small_kc, small_mc, cs.l3 / 4)
        };
        let nc = ((b_block / (kc * f)).clamp(nr, 8192) / nr) * nr;
        let slab = (cs.l2 / (small_kc * nr * f)).max(1);
        Blocking {
            mc,
            kc,
            nc,
            small_mc,
            small_kc,
            slab,
        }
    }
}

impl Blocking {
    /// This blocking with some sizes replaced, from `spec`: comma-separated `name=value` pairs,
    /// names `kc`, `mc`, `nc` (the general nest), `small_kc`, `small_mc` (the small-M nest) and
    /// `slab`, e.g. `kc=512,mc=120`. For measuring other blockings (`kiln bench matmul
    /// --blocking`), which is how the rules above were chosen: `mc` values are rounded up to a
    /// multiple of `mr`, `nc` down to a multiple of `nr` (at least `nr`), depths up to a
    /// multiple of 8. Products with another blocking differ from the default's in rounding
    /// (another depth cut), not in anything else.
    pub fn with_overrides(self, spec: &str, mr: usize, nr: usize) -> Result<Blocking, String> {
        let mut b = self;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("blocking: `{item}` is not name=value"))?;
            let v: usize = value
                .trim()
                .parse()
                .ok()
                .filter(|&v| (1..=1 << 20).contains(&v))
                .ok_or_else(|| format!("blocking: {name} must be a size from 1 to 2^20"))?;
            match name.trim() {
                "kc" => b.kc = v.next_multiple_of(8),
                "mc" => b.mc = v.next_multiple_of(mr),
                "nc" => b.nc = (v / nr).max(1) * nr,
                "small_kc" => b.small_kc = v.next_multiple_of(8),
                "small_mc" => b.small_mc = v.next_multiple_of(mr),
                "slab" => b.slab = v,
                other => {
                    return Err(format!(
                        "blocking: unknown size `{other}` (kc, mc, nc, small_kc, small_mc, slab)"
                    ))
                }
            }
        }
        Ok(b)
    }
}

/// Kernels at least this wide take the deep general blocking (see the module comment).
const DEEP_NR: usize = 32;

/// `k` cut into the whole number of equal blocks (a multiple of 8 deep) nearest to `k / kc`.
fn cut_depth(k: usize, kc: usize) -> usize {
    if k <= kc {
        return kc;
    }
    let blocks = ((2 * k + kc) / (2 * kc)).max(1);
    k.div_ceil(blocks).next_multiple_of(8)
}

impl Blocking {
    /// The blocking for a product of depth `k`: the depth cut into the whole number of equal
    /// blocks (a multiple of 8 deep) nearest to `k / KC`, instead of whole `KC` blocks and a
    /// short last one, so a block is between 2/3 and 3/2 of `KC` deep. Measured on a Zen 3 core
    /// with `KC = 768`: D2 of DCGAN (`K = 1024`, 128 rows) ran as 768 + 256 1.5 % slower than as
    /// one block (each depth block reads and writes all of C again) and 2 × 512 3 % slower, so
    /// it stays one block. Depends on `k` only, so every thread count, and `PackedB`, cut the
    /// depth the same way.
    pub fn for_depth(self, k: usize) -> Blocking {
        Blocking {
            kc: cut_depth(k, self.kc),
            ..self
        }
    }
}

impl Blocking {
    /// The blocking of the small-M loop nest (all of M one packed A block, B packed slab by
    /// slab into L2 and used once) for an `m`-row product of depth `k`, if it applies; `MC` and
    /// `KC` here are `small_mc` and `small_kc`, and the returned `kc` is the nest's depth cut.
    /// When `m ≤ MC`, the depth is cut as [`Blocking::for_depth`] cuts it by `KC`; when a
    /// shallower cut fits all `m` rows into the A block's `MC·KC` budget, `MC·KC / m` being at
    /// least 2/5 of `KC`, that cut: `k` in the fewest equal blocks of at most `MC·KC / m` plus an
    /// eighth (rounded up to a multiple of 8). The slab keeps about its size in bytes (rounded
    /// to the nearest number of panels). Measured on a Zen 3 core (`KC = 768`, `MC = 174`) at
    /// `m × 4096 × 2048`, interleaved: `m = 256` (cut 512)
    /// 80–84 → 87–88 GFLOP/s on one thread, 123–138 → 132–165 on two; `m = 384` (cut 344)
    /// 82–86 → 86–90 and about even on two; `m = 512` (cut 256) 86–89 → 85–87, hence 2/5.
    pub fn single_block(self, m: usize, k: usize) -> Option<Blocking> {
        let (mc, kc) = (self.small_mc, self.small_kc);
        let cut = if m <= mc {
            cut_depth(k, kc)
        } else {
            let most = mc * kc / m;
            if 5 * most < 2 * kc || most == 0 {
                return None;
            }
            // MC only about fills L2: an eighth over the budget keeps a depth just past it whole.
            let blocks = k.div_ceil(most + most / 8);
            k.div_ceil(blocks).next_multiple_of(8)
        };
        Some(Blocking {
            kc: cut,
            slab: ((self.slab * kc + cut / 2) / cut).max(1),
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("32K"), Some(32768));
        assert_eq!(parse_size("32768K"), Some(32 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn single_block_fits_a_in_its_budget() {
        let b = Blocking {
            mc: 174,
            kc: 768,
            nc: 2720,
            small_mc: 174,
            small_kc: 768,
            slab: 10,
        };
        // m ≤ MC: the general depth cut, the slab about the same bytes.
        for (m, k) in [(1, 1), (128, 768), (174, 2048), (100, 5000)] {
            let s = b.single_block(m, k).unwrap();
            assert_eq!(s.kc, b.for_depth(k).kc, "{m}x{k}");
            assert_eq!(s.slab, (b.slab * b.kc + s.kc / 2) / s.kc, "{m}x{k}");
        }
        // Taller: a shallower cut that fits m rows in MC·KC, at least 2/5 of KC deep.
        assert_eq!(b.single_block(256, 2048).map(|s| s.kc), Some(512));
        assert_eq!(b.single_block(384, 2048).map(|s| s.kc), Some(344));
        assert_eq!(b.single_block(256, 400).map(|s| s.kc), Some(400));
        assert_eq!(b.single_block(512, 2048), None);
        assert_eq!(b.single_block(4096, 7), None);
        for m in 175..=440 {
            for k in [1, 7, 300, 511, 1024, 2049, 4096] {
                let most = b.mc * b.kc / m;
                let Some(s) = b.single_block(m, k) else {
                    assert!(5 * most < 2 * b.kc, "{m}x{k}");
                    continue;
                };
                assert!(5 * most >= 2 * b.kc, "{m}x{k}");
                assert_eq!((s.mc, s.nc), (b.mc, b.nc));
                assert_eq!(s.kc % 8, 0);
                // Equal blocks within the budget (an eighth over, and the rounding to 8).
                let blocks = k.div_ceil(s.kc);
                assert_eq!(k.div_ceil(blocks).next_multiple_of(8), s.kc, "{m}x{k}");
                assert!(s.kc - 7 <= most + most / 8, "{m}x{k}: kc {}", s.kc);
                // The fewest such blocks.
                assert!(
                    blocks == 1 || k.div_ceil(blocks - 1) > most + most / 8,
                    "{m}x{k}"
                );
            }
        }
    }

    #[test]
    fn depth_cut_into_equal_blocks() {
        let b = Blocking::for_kernel(6, 16, CacheSizes::FALLBACK);
        for k in [
            1,
            7,
            64,
            b.kc,
            b.kc + 1,
            1024,
            1152,
            1153,
            2048,
            3072,
            4096,
            5000,
        ] {
            let d = b.for_depth(k);
            assert_eq!((d.mc, d.nc), (b.mc, b.nc));
            if k <= b.kc {
                assert_eq!(d, b);
                continue;
            }
            assert_eq!(d.kc % 8, 0);
            let blocks = k.div_ceil(d.kc);
            // Equal blocks but the last, which is short by less than 8 per block.
            assert!(
                k - (blocks - 1) * d.kc + 8 * blocks > d.kc,
                "k {k}: kc {}",
                d.kc
            );
            assert!(
                3 * d.kc >= 2 * b.kc && 2 * d.kc <= 3 * b.kc + 16,
                "k {k}: kc {}",
                d.kc
            );
        }
    }

    #[test]
    fn deep_general_nest_only_for_wide_kernels() {
        let zen5 = CacheSizes {
            l1d: 48 << 10,
            l2: 1 << 20,
            l3: 32 << 20,
        };
        let b = Blocking::for_kernel(12, 32, zen5);
        // B micro-panel in a quarter of L2, A block four times L2, B block all of L3; the small-M
        // nest keeps 3/32 of L2.
        assert_eq!((b.kc, b.mc, b.nc), (2048, 516, 4096));
        assert_eq!((b.small_kc, b.small_mc, b.slab), (768, 348, 10));
        // A 2048-deep product is one block in the general nest, three in the small-M one.
        assert_eq!(b.for_depth(2048).kc, 2048);
        assert_eq!(b.single_block(128, 2048).map(|s| s.kc), Some(688));
        for (mr, nr) in [(6, 16), (4, 4)] {
            let b = Blocking::for_kernel(mr, nr, zen5);
            assert_eq!((b.kc, b.mc), (b.small_kc, b.small_mc), "{mr}x{nr}");
        }
    }

    #[test]
    fn overrides_keep_the_tile_multiples() {
        let b = Blocking::for_kernel(6, 16, CacheSizes::FALLBACK);
        let o = b
            .with_overrides(
                "kc=500, mc=100,nc=1000,small_kc=300,small_mc=50,slab=4",
                6,
                16,
            )
            .unwrap();
        assert_eq!((o.kc, o.mc, o.nc), (504, 102, 992));
        assert_eq!((o.small_kc, o.small_mc, o.slab), (304, 54, 4));
        assert_eq!(b.with_overrides("", 6, 16).unwrap(), b);
        assert_eq!(b.with_overrides("nc=3", 6, 16).unwrap().nc, 16);
        for bad in ["kc", "kc=0", "kc=x", "qc=8", "mc=-1"] {
            assert!(b.with_overrides(bad, 6, 16).is_err(), "{bad}");
        }
    }

    #[test]
    fn blocking_is_multiple_of_tile() {
        for cs in [CacheSizes::FALLBACK, CacheSizes::detect()] {
            for (mr, nr) in [(6, 16), (12, 32), (4, 4)] {
                let b = Blocking::for_kernel(mr, nr, cs);
                assert_eq!(b.mc % mr, 0);
                assert_eq!(b.small_mc % mr, 0);
                assert_eq!(b.nc % nr, 0);
                assert!(b.kc >= 64 && b.mc >= mr && b.nc >= nr);
                assert!(b.small_kc >= 64 && b.small_kc <= b.kc && b.small_mc >= mr);
            }
        }
    }
}
