//! Registries of what the library has handed out, so that a freed handle, a double free or a
//! pointer that never came from the library is reported instead of dereferenced.
//!
//! Model handles are not addresses at all: a `janus_model *` is a number that is never reused,
//! looked up in a table of shared models. A call holds its own reference to the model for as long
//! as it runs, so freeing a model while other threads still use it is safe (the memory goes when
//! the last call returns). Result objects (answers, images, token grids, image lists) are real
//! pointers to library-owned structs the caller reads directly; the table of their addresses
//! catches double frees and frees of foreign pointers (a stale pointer is only caught until a
//! later result happens to reuse its address).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use janus_core::pipeline::Janus;

use crate::status::FfiError;

/// An opaque handle to a loaded model (from `janus_model_load`, freed by `janus_model_free`).
pub struct janus_model {
    _opaque: [u8; 0],
}

struct Models {
    next: usize,
    live: BTreeMap<usize, Arc<Janus>>,
}

static MODELS: Mutex<Models> = Mutex::new(Models {
    next: 1,
    live: BTreeMap::new(),
});

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables stay consistent even if a holder panicked (no code between updates can panic).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// One model is shared by the calls of several threads.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Janus>();
};

/// Registers a model and returns its handle.
pub(crate) fn insert_model(model: Janus) -> *mut janus_model {
    let mut models = lock(&MODELS);
    let id = models.next;
    models.next += 1;
    models.live.insert(id, Arc::new(model));
    std::ptr::without_provenance_mut(id)
}

/// The model behind a handle.
pub(crate) fn lookup_model(handle: *const janus_model) -> Result<Arc<Janus>, FfiError> {
    if handle.is_null() {
        return Err(FfiError::Argument("model is NULL".into()));
    }
    lock(&MODELS)
        .live
        .get(&handle.addr())
        .cloned()
        .ok_or_else(|| stale("model", handle.addr()))
}

/// Unregisters a model; it is dropped when no call uses it any more.
pub(crate) fn remove_model(handle: *mut janus_model) -> Result<(), FfiError> {
    let removed = lock(&MODELS).live.remove(&handle.addr());
    match removed {
        Some(model) => {
            drop(model);
            Ok(())
        }
        None => Err(stale("model", handle.addr())),
    }
}

fn stale(kind: &str, addr: usize) -> FfiError {
    FfiError::Handle(format!(
        "{addr:#x} is not a live {kind}: it was already freed, or did not come from this library"
    ))
}

/// A library-owned result whose public part (`Public`, the first field of a `#[repr(C)]`
/// struct) is what C sees.
///
/// # Safety
/// `Self` must be `#[repr(C)]` with a field of type `Public` first, so that a pointer to `Self`
/// is a pointer to its public part.
pub(crate) unsafe trait Owned: Sized {
    /// The struct C reads.
    type Public;
    /// What it is, for messages.
    const KIND: &'static str;
}

static OBJECTS: Mutex<BTreeMap<usize, &'static str>> = Mutex::new(BTreeMap::new());

/// Hands a result to C.
pub(crate) fn publish<T: Owned>(object: T) -> *mut T::Public {
    let ptr = Box::into_raw(Box::new(object));
    lock(&OBJECTS).insert(ptr.addr(), T::KIND);
    ptr.cast()
}

/// Takes a result back from C to free it: `None` for NULL, an error when `ptr` is not a live
/// result of this kind.
pub(crate) fn reclaim<T: Owned>(ptr: *mut T::Public) -> Result<Option<Box<T>>, FfiError> {
    if ptr.is_null() {
        return Ok(None);
    }
    let mut objects = lock(&OBJECTS);
    match objects.get(&ptr.addr()) {
        Some(&kind) if kind == T::KIND => {
            objects.remove(&ptr.addr());
            drop(objects);
            // SAFETY: the address was registered by `publish::<T>` (same kind) and has not been
            // reclaimed since, so it is a live `Box<T>` allocation.
            Ok(Some(unsafe { Box::from_raw(ptr.cast::<T>()) }))
        }
        Some(&kind) => Err(FfiError::Handle(format!(
            "{:#x} is a {kind}, not a {}",
            ptr.addr(),
            T::KIND
        ))),
        None => Err(stale(T::KIND, ptr.addr())),
    }
}
