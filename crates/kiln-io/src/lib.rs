//! kiln-io: safetensors reading and writing.
//!
//! * [`SafeTensors`] opens a file with a memory map ([`SafeTensors::open`]) or one plain read
//!   ([`SafeTensors::read`]), validates the header against every defect a hostile file can carry
//!   (see [`header`]), and hands out [`kiln_tensor::Tensor`]s by name that borrow the file's
//!   bytes without copying. The map stays alive, by reference counting, as long as any tensor
//!   does.
//! * [`write_safetensors`] writes tensors and `__metadata__` atomically (temporary file in the
//!   same folder, fsync, rename), in the same byte layout as the reference `safetensors` package.
//!
//! Alignment: safetensors does not promise that a tensor starts at a multiple of its element
//! size. A tensor that does is borrowed; one that does not is copied once into a 64-byte-aligned
//! buffer when it is taken ([`kiln_tensor::Tensor::is_borrowed`] is then false). Files written by
//! kiln or by the reference package are always aligned.
pub mod fuzz;
pub mod header;
pub mod reader;
pub mod writer;

pub use header::{Header, TensorInfo, MAX_HEADER_LEN, METADATA_KEY};
pub use reader::{LoadMode, SafeTensors};
pub use writer::{serialize, write_atomic, write_safetensors};
