//! The gear table: 256 pseudo-random 64-bit values, one per byte value.
//!
//! It is generated at compile time from a fixed seed with SplitMix64, so it is deterministic,
//! documented, and reproducible by any independent implementation (the tests rebuild it in Python).

/// Seed of the SplitMix64 sequence the gear table is drawn from. Changing it changes every cut point.
pub const GEAR_SEED: u64 = 0x5375_7065_724d_6163; // "SuperMac"

const fn splitmix64(state: u64) -> (u64, u64) {
    let state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (state, z ^ (z >> 31))
}

const fn make_gear() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state = GEAR_SEED;
    let mut i = 0;
    while i < 256 {
        let (next, value) = splitmix64(state);
        state = next;
        table[i] = value;
        i += 1;
    }
    table
}

const fn shift_left_one(table: [u64; 256]) -> [u64; 256] {
    let mut out = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        out[i] = table[i] << 1;
        i += 1;
    }
    out
}

/// `GEAR[b]` is added to the rolling hash for input byte `b`.
pub static GEAR: [u64; 256] = make_gear();

/// `GEAR[b] << 1`, used by the two-bytes-per-step loop (see `Chunker::cut`).
pub static GEAR_LS: [u64; 256] = shift_left_one(make_gear());
