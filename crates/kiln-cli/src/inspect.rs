//! `kiln inspect FILE.safetensors [--json]`: one row per tensor (name, dtype, shape, bytes) in
//! file order, then the total parameter count and total bytes.
//!
//! The file is memory-mapped and only its header is read, so inspecting a multi-gigabyte
//! checkpoint is instant. Every defect the reader detects (see `kiln_io::header`) ends the command
//! with one `error:` line.
use clap::Args;
use kiln_io::SafeTensors;
use kiln_tensor::Result;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The safetensors file.
    pub file: PathBuf,
    /// Print JSON instead of a table: {"file", "file_bytes", "header_bytes", "tensors":
    /// [{"name", "dtype", "shape", "bytes", "offset"}], "total_params", "total_bytes", "metadata"}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let st = SafeTensors::open(&args.file)?;
    let text = if args.json {
        render_json(&st)
    } else {
        render_table(&st)
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`kiln inspect … | head`) is not an error worth a message.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// The table form.
pub fn render_table(st: &SafeTensors) -> String {
    let rows: Vec<[String; 4]> = st
        .tensors()
        .iter()
        .map(|t| {
            [
                // A name may hold any character; keep one tensor per line.
                t.name.escape_debug().to_string(),
                t.dtype.safetensors_name().to_string(),
                shape_str(&t.shape),
                t.size_in_bytes().to_string(),
            ]
        })
        .collect();
    let head = ["name", "dtype", "shape", "bytes"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        )
    };
    let mut s = format!(
        "{}: {} tensors, {} bytes (header {} bytes)\n",
        st.path().display(),
        st.len(),
        st.file_len(),
        st.header().data_start - 8
    );
    s.push_str(&line(head));
    for r in &rows {
        s.push_str(&line([&r[0], &r[1], &r[2], &r[3]]));
    }
    s.push_str(&format!(
        "total: {} parameters, {} bytes\n",
        st.total_params(),
        st.header().data_len
    ));
    for (k, v) in st.metadata() {
        s.push_str(&format!("metadata: {k} = {}\n", v.escape_debug()));
    }
    s
}

/// The JSON form (one object, pretty-printed).
pub fn render_json(st: &SafeTensors) -> String {
    let data_start = st.header().data_start;
    let tensors: Vec<_> = st
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "bytes": t.size_in_bytes(),
                "offset": data_start + t.data_offsets.0,
            })
        })
        .collect();
    let total_params: u64 = st.tensors().iter().map(|t| t.numel() as u64).sum();
    let v = json!({
        "file": st.path().display().to_string(),
        "file_bytes": st.file_len(),
        "header_bytes": data_start - 8,
        "tensors": tensors,
        "total_params": total_params,
        "total_bytes": st.header().data_len,
        "metadata": st.metadata(),
    });
    let mut s = serde_json::to_string_pretty(&v).expect("JSON values always serialise");
    s.push('\n');
    s
}
