//! Fusion: a block's branches summed into one conv. [`compose`] is the branch algebra (each
//! branch's per-channel ops as one affine; sequences as kernel rows), [`rows`] the one fusion
//! routine ([`rows::fuse_rows`]), [`block`] the per-block, per-chunk step every writer calls.

pub mod block;
pub mod compose;
pub mod rows;
