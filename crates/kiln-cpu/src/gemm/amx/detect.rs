//! Run-time detection of AMX-BF16 and of the cache sizes the blocking is derived from.
//!
//! AMX is usable when all of these hold (checked once per process, cached in a `OnceLock`):
//! 1. CPUID leaf 7 (sub-leaf 0) EDX reports AMX-TILE (bit 24) and AMX-BF16 (bit 22);
//! 2. the OS enabled the tile state in XCR0 (XTILECFG bit 17, XTILEDATA bit 18; read with
//!    `xgetbv` after CPUID.1:ECX.OSXSAVE);
//! 3. CPUID leaf 0x1D sub-leaf 1 describes palette 1 as this code uses it: 8 tiles of
//!    16 rows × 64 bytes;
//! 4. Linux granted this process the tile-data state: `arch_prctl(ARCH_REQ_XCOMP_PERM,
//!    XFEATURE_XTILEDATA)` returned 0. The permission is per process and permanent; the tile
//!    *configuration* (`ldtilecfg`) is per thread and is done by each task that uses tiles;
//! 5. the process opted in with `KILN_AMX_UNVERIFIED=1` in its environment. The tile kernel
//!    (`tiles.rs`) has only ever run as its software model: no AMX machine has run it yet, so
//!    until one has (and `tests/gemm_amx.rs::amx_hardware_matches_software_model` passed there
//!    with the variable set) a CPU with AMX takes the AVX512-BF16 kernel instead, which has run
//!    on hardware. `tests/gemm_amx.rs::amx_unreachable_without_opt_in` and the unit test below
//!    prove the path unreachable without the variable, on any CPU.
use std::sync::OnceLock;

/// The environment variable that lets a process use the AMX tile kernel (value `1`), which has
/// not yet been validated on AMX hardware.
pub const AMX_OPT_IN: &str = "KILN_AMX_UNVERIFIED";

/// Why AMX is refused when the hardware has it but the process did not opt in.
const NOT_OPTED_IN: &str = "the AMX tile kernel has not been validated on AMX hardware yet; \
                            set KILN_AMX_UNVERIFIED=1 to use it";

/// Whether AMX-BF16 can be used by this process, and if not, why.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AmxSupport {
    pub available: bool,
    /// Why AMX is unavailable (empty when available).
    pub reason: &'static str,
}

/// The cached answer for this process (the first call may issue one `arch_prctl`).
pub(crate) fn amx_support() -> AmxSupport {
    static SUPPORT: OnceLock<AmxSupport> = OnceLock::new();
    *SUPPORT.get_or_init(|| {
        let opted_in = std::env::var(AMX_OPT_IN).is_ok_and(|v| v == "1");
        gate(probe(), opted_in)
    })
}

/// What the hardware probe found, as the process may use it: an AMX the hardware and OS
/// support stays unavailable unless `opted_in` (the tile kernel is not yet validated on
/// hardware; see the module comment).
fn gate(hardware: AmxSupport, opted_in: bool) -> AmxSupport {
    if hardware.available && !opted_in {
        unavailable(NOT_OPTED_IN)
    } else {
        hardware
    }
}

fn unavailable(reason: &'static str) -> AmxSupport {
    AmxSupport {
        available: false,
        reason,
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn probe() -> AmxSupport {
    unavailable("AMX is only used on x86_64 Linux")
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn probe() -> AmxSupport {
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf < 7 {
        return unavailable("CPUID has no leaf 7");
    }
    let l7 = cpuid(7, 0);
    let amx_bf16 = l7.edx & (1 << 22) != 0;
    let amx_tile = l7.edx & (1 << 24) != 0;
    if !(amx_bf16 && amx_tile) {
        return unavailable("the CPU has no AMX-TILE/AMX-BF16 (CPUID.7.0:EDX bits 24/22)");
    }
    let l1 = cpuid(1, 0);
    if l1.ecx & (1 << 27) == 0 {
        return unavailable("the OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE)");
    }
    let xcr0 = xgetbv0();
    if xcr0 & (3 << 17) != 3 << 17 {
        return unavailable("the OS has not enabled the AMX tile state in XCR0 (bits 17, 18)");
    }
    if max_leaf < 0x1d {
        return unavailable("CPUID has no tile-information leaf 0x1D");
    }
    let palette0 = cpuid(0x1d, 0);
    if palette0.eax < 1 {
        return unavailable("CPUID.1D reports no tile palette 1");
    }
    let palette1 = cpuid(0x1d, 1);
    let bytes_per_row = palette1.ebx & 0xffff;
    let max_names = palette1.ebx >> 16;
    let max_rows = palette1.ecx & 0xffff;
    if bytes_per_row < 64 || max_names < 8 || max_rows < 16 {
        return unavailable("tile palette 1 is smaller than 8 tiles of 16 rows x 64 bytes");
    }
    if request_tile_permission() != 0 {
        return unavailable("Linux refused arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)");
    }
    AmxSupport {
        available: true,
        reason: "",
    }
}

/// CPUID `leaf`, `sub`-leaf (out-of-range leaves return the highest basic leaf's data, which
/// the callers avoid by checking leaf 0's maximum first).
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid_count` is a safe function in newer Rust versions
fn cpuid(leaf: u32, sub: u32) -> std::arch::x86_64::CpuidResult {
    // SAFETY: the CPUID instruction exists on every x86_64 CPU and only reads registers.
    unsafe { std::arch::x86_64::__cpuid_count(leaf, sub) }
}

/// XCR0, the OS-enabled state components.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: called only after CPUID.1:ECX.OSXSAVE was found set, which makes XGETBV with
    // ECX = 0 valid; it reads a register and touches no memory.
    unsafe {
        std::arch::asm!(
            "xgetbv",
            in("ecx") 0u32,
            out("eax") lo,
            out("edx") hi,
            options(nomem, nostack, preserves_flags),
        );
    }
    ((hi as u64) << 32) | lo as u64
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; returns 0 or `-errno`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> i64 {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: a plain Linux x86_64 system call with two integer arguments and no pointers; the
    // kernel clobbers rcx and r11 (declared), and an unknown request only returns -EINVAL.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Data-cache sizes in bytes: (L1d per core, L2 per core).
///
/// Read from CPUID leaf 4 (deterministic cache parameters; present on every AMX CPU). Falls back
/// to Sapphire Rapids' 48 KiB / 2 MiB when the leaf is missing.
pub(crate) fn cache_sizes() -> (usize, usize) {
    static SIZES: OnceLock<(usize, usize)> = OnceLock::new();
    *SIZES.get_or_init(|| {
        let (mut l1, mut l2) = (48 << 10, 2 << 20);
        #[cfg(target_arch = "x86_64")]
        {
            let max_leaf = cpuid(0, 0).eax;
            if max_leaf >= 4 {
                for sub in 0..16 {
                    let r = cpuid(4, sub);
                    let kind = r.eax & 0x1f;
                    if kind == 0 {
                        break;
                    }
                    let level = (r.eax >> 5) & 7;
                    let ways = ((r.ebx >> 22) & 0x3ff) as usize + 1;
                    let parts = ((r.ebx >> 12) & 0x3ff) as usize + 1;
                    let line = (r.ebx & 0xfff) as usize + 1;
                    let sets = r.ecx as usize + 1;
                    let size = ways * parts * line * sets;
                    // kind 1 = data, 3 = unified
                    if level == 1 && kind == 1 {
                        l1 = size;
                    } else if level == 2 && (kind == 1 || kind == 3) {
                        l2 = size;
                    }
                }
            }
        }
        (l1, l2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Even where the CPU, the OS and Linux all allow AMX, the tile kernel is unavailable
    /// unless the process opted in; a CPU without AMX stays without it either way.
    #[test]
    fn amx_needs_the_opt_in() {
        let hw = AmxSupport {
            available: true,
            reason: "",
        };
        let refused = gate(hw, false);
        assert!(!refused.available);
        assert!(refused.reason.contains(AMX_OPT_IN), "{}", refused.reason);
        assert!(gate(hw, true).available);
        let none = unavailable("no AMX");
        assert!(!gate(none, true).available && !gate(none, false).available);
        assert_eq!(gate(none, true).reason, "no AMX");
    }
}
