//! The kernel files of the top-level `kernels/` folder, embedded in the library so that a
//! program finds them wherever it runs. Each `.cu` file is one module (compiled once per device
//! and architecture); the `.cuh` headers it includes are pasted in by [`expand`] (NVRTC gets
//! one self-contained source, the CPU emulator gets the same text).

/// One kernel file.
#[derive(Debug)]
pub struct KernelFile {
    /// File name inside `kernels/`, e.g. `softmax.cu`.
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! kernel_files {
    ($($konst:ident = $file:literal;)*) => {
        $(
            #[doc = concat!("`kernels/", $file, "`.")]
            pub static $konst: KernelFile = KernelFile {
                name: $file,
                text: include_str!(concat!("../../../kernels/", $file)),
            };
        )*
        /// Every kernel file (a test checks that this lists the whole folder).
        pub static ALL: &[&KernelFile] = &[$(&$konst),*];
    };
}

kernel_files! {
    ADAM = "adam.cu";
    ATTENTION = "attention.cu";
    ATTENTION_TC = "attention_tc.cu";
    BATCH_NORM = "batch_norm.cu";
    CAST = "cast.cu";
    CONV = "conv.cu";
    ELEMENTWISE = "elementwise.cu";
    EMBEDDING = "embedding.cu";
    GEMM_F32 = "gemm_f32.cu";
    GEMM_TC = "gemm_tc.cu";
    GEMV = "gemv.cu";
    LAYER_NORM = "layer_norm.cu";
    LOSS = "loss.cu";
    PROBE = "probe.cu";
    REDUCE = "reduce.cu";
    SOFTMAX = "softmax.cu";
}

/// The headers kernel files may include with `#include "NAME.cuh"`.
pub static HEADERS: &[(&str, &str)] =
    &[("common.cuh", include_str!("../../../kernels/common.cuh"))];

/// `file`'s text with every `#include "X.cuh"` of a known header replaced by the header's text
/// (each header once; `#pragma once` lines dropped), with `#line` markers so that compiler
/// messages point into the right file.
pub fn expand(file: &KernelFile) -> String {
    let mut out = String::new();
    let mut included: Vec<&str> = Vec::new();
    expand_into(file.name, file.text, &mut out, &mut included);
    out
}

fn expand_into<'a>(name: &str, text: &'a str, out: &mut String, included: &mut Vec<&'a str>) {
    out.push_str(&format!("#line 1 \"{name}\"\n"));
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#pragma once") {
            out.push('\n');
            continue;
        }
        if let Some(inc) = t
            .strip_prefix("#include \"")
            .and_then(|r| r.split('"').next())
        {
            if let Some((hname, htext)) = HEADERS.iter().find(|(h, _)| *h == inc) {
                if !included.contains(hname) {
                    included.push(hname);
                    expand_into(hname, htext, out, included);
                }
                out.push_str(&format!("#line {} \"{name}\"\n", i + 2));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// The names of the `extern "C" __global__` functions of a kernel file, in order.
pub fn kernel_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("extern \"C\" __global__") {
        rest = &rest[at + "extern \"C\" __global__".len()..];
        // `void [__launch_bounds__(...)] NAME(`
        let Some(paren) = rest.find('(') else { break };
        let mut head = &rest[..paren];
        let mut after = &rest[paren..];
        if head.contains("__launch_bounds__") {
            // skip the bounds' parentheses
            let close = after.find(')').map(|c| c + 1).unwrap_or(after.len());
            after = &after[close..];
            let Some(p2) = after.find('(') else { break };
            head = &after[..p2];
            after = &after[p2..];
        }
        if let Some(name) = head.split_whitespace().last() {
            if name != "void" {
                names.push(name.to_string());
            }
        }
        rest = after;
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_found() {
        let src = "extern \"C\" __global__ void a(int x) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(256, 2) b_2(float* y) {}";
        assert_eq!(kernel_names(src), vec!["a", "b_2"]);
    }

    #[test]
    fn headers_are_pasted_once() {
        let f = KernelFile {
            name: "t.cu",
            text: "#include \"common.cuh\"\n#include \"common.cuh\"\nint x;\n",
        };
        let e = expand(&f);
        assert_eq!(e.matches("warp_sum(float v)").count(), 1);
        assert!(e.contains("#line 3 \"t.cu\"\nint x;"));
    }
}
