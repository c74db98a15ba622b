//! Generation loops (outside the model code): sampling, and the image-token loop.

pub(crate) mod device;
pub mod forced;
pub mod image;
pub mod sampling;
pub mod text;

use burn::tensor::{Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model::JanusModel;

/// Reads `t` back to the host: the one read a step or a decode makes. A device that fails (a
/// GPU whose buffer could not be allocated, say) is an error, never a panic:
/// [`Error::OutOfMemory`] for an allocation, else [`Error::Unsupported`] naming `what`.
pub(crate) fn read_back<const D: usize, K: burn::tensor::kind::Basic>(
    t: Tensor<D, K>,
    what: &str,
) -> Result<TensorData> {
    let bytes = t.shape().num_elements() * t.dtype().size();
    crate::device::count_host_read(&t.device(), bytes);
    t.try_into_data().map_err(|e| {
        let message = format!("{e}");
        if message.contains("allocate") {
            Error::OutOfMemory(format!("{what} on the device: {message}"))
        } else {
            Error::Unsupported(format!("the device failed {what}: {message}"))
        }
    })
}

/// Makes sure the memory of `rows` decoding rows — their key/value cache for `positions`
/// positions and a step's logits of `logits_width` — can be had before decoding begins
/// ([`crate::limits::reserve`]): [`Error::OutOfMemory`](crate::Error::OutOfMemory) instead of
/// an abort part way through.
pub(crate) fn reserve_rows(
    model: &JanusModel,
    rows: usize,
    positions: usize,
    logits_width: usize,
    what: &str,
) -> Result<()> {
    let c = model.llm.config();
    let per_row = (c.num_hidden_layers as u128)
        * 2
        * (c.num_key_value_heads as u128)
        * (c.head_dim as u128)
        * (positions as u128)
        + logits_width as u128;
    let bytes = per_row * (rows as u128) * 4;
    crate::limits::reserve(usize::try_from(bytes).unwrap_or(usize::MAX), what)
}
