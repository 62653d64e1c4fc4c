//! The seeded generator for everything random in training (data order, the
//! validation split, LoRA initialisation): minnow's one [`SplitMix64`].
//! Its whole state is one u64, and every use derives its stream from
//! (seed, purpose, epoch), so a resumed run needs only the step number to
//! reproduce the order exactly.

pub use minnow_kernels::mix::SplitMix64;
