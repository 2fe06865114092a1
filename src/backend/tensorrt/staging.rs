//! The host side of a TensorRT call: a ragged batch of sequences laid out as the padded
//! `[batch, width]` tensors an engine takes (input_ids, attention_mask, position_ids), and where
//! each sequence's last logits are. Pure Rust, tested without TensorRT.
//!
//! Engines with `position_ids` get **left** padding: every sequence ends in the last column, so
//! the past cache stays one rectangle and each step appends one column; pads are masked and
//! positions count real tokens only, so each sequence sees exactly what it would see alone.
//! Engines without `position_ids` (the study's model) number positions 0.. themselves, so they get
//! **right** padding: causal attention never lets a real token see the pads after it.

use super::meta::ElemType;

/// Where the pads of a shorter sequence go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Left,
    Right,
}

/// Fills `[batch, width]` input_ids, attention_mask and position_ids for sequences of `lens`
/// tokens (`token(seq, pos)`), `width` = the longest; returns `width`. Pads are token 0, mask 0,
/// position 0. The slices must hold at least `batch * width` values.
pub fn fill_full(
    padding: Padding,
    lens: &[usize],
    token: impl Fn(usize, usize) -> u32,
    ids: &mut [i64],
    mask: &mut [i64],
    positions: &mut [i64],
) -> usize {
    let width = lens.iter().copied().max().unwrap_or(0);
    for (seq, &len) in lens.iter().enumerate() {
        let pad = width - len;
        for col in 0..width {
            let at = seq * width + col;
            let pos = match padding {
                Padding::Left => col.checked_sub(pad),
                Padding::Right => (col < len).then_some(col),
            };
            match pos {
                Some(p) => {
                    ids[at] = token(seq, p) as i64;
                    mask[at] = 1;
                    positions[at] = p as i64;
                }
                None => {
                    ids[at] = 0;
                    mask[at] = 0;
                    positions[at] = 0;
                }
            }
        }
    }
    width
}

/// The column of each sequence's last real token in a full pass of `width` columns.
pub fn last_columns(padding: Padding, lens: &[usize], width: usize) -> impl Iterator<Item = usize> + '_ {
    lens.iter().map(move |&len| match padding {
        Padding::Left => width - 1,
        Padding::Right => len - 1,
    })
}

/// The `[batch, width]` attention mask of a decode step over a left-padded past: sequence `seq`
/// has `pads[seq]` masked columns, then ones (the past's real tokens and the new one).
pub fn fill_decode_mask(pads: &[usize], width: usize, mask: &mut [i64]) {
    for (seq, &pad) in pads.iter().enumerate() {
        for col in 0..width {
            mask[seq * width + col] = i64::from(col >= pad);
        }
    }
}

/// Writes `values` into `out` as the engine's element type (int32, int64 or float32), returning
/// the bytes written. Values are token ids, positions and 0/1 masks, so every conversion is exact.
pub fn encode(dtype: ElemType, values: &[i64], out: &mut [u8]) -> usize {
    let size = dtype.size();
    for (v, chunk) in values.iter().zip(out.chunks_exact_mut(size)) {
        match dtype {
            ElemType::I64 => chunk.copy_from_slice(&v.to_ne_bytes()),
            ElemType::F32 => chunk.copy_from_slice(&(*v as f32).to_ne_bytes()),
            _ => chunk.copy_from_slice(&(*v as i32).to_ne_bytes()),
        }
    }
    values.len() * size
}

/// Converts one row of engine logits (float32 or float16 bytes) to f32.
pub fn decode_logits(dtype: ElemType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        ElemType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_ne_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(seq: usize, pos: usize) -> u32 {
        (100 * (seq + 1) + pos) as u32
    }

    #[test]
    fn left_padding_ends_every_sequence_in_the_last_column() {
        let lens = [3, 1, 2];
        let (mut ids, mut mask, mut pos) = (vec![-9; 9], vec![-9; 9], vec![-9; 9]);
        let width = fill_full(Padding::Left, &lens, tokens, &mut ids, &mut mask, &mut pos);
        assert_eq!(width, 3);
        assert_eq!(ids, vec![100, 101, 102, 0, 0, 200, 0, 300, 301]);
        assert_eq!(mask, vec![1, 1, 1, 0, 0, 1, 0, 1, 1]);
        assert_eq!(pos, vec![0, 1, 2, 0, 0, 0, 0, 0, 1], "positions count real tokens only");
        assert_eq!(last_columns(Padding::Left, &lens, width).collect::<Vec<_>>(), vec![2, 2, 2]);
    }

    #[test]
    fn right_padding_keeps_positions_from_zero() {
        let lens = [1, 3];
        let (mut ids, mut mask, mut pos) = (vec![0; 6], vec![0; 6], vec![0; 6]);
        let width = fill_full(Padding::Right, &lens, tokens, &mut ids, &mut mask, &mut pos);
        assert_eq!(width, 3);
        assert_eq!(ids, vec![100, 0, 0, 200, 201, 202]);
        assert_eq!(mask, vec![1, 0, 0, 1, 1, 1]);
        assert_eq!(pos, vec![0, 0, 0, 0, 1, 2]);
        assert_eq!(last_columns(Padding::Right, &lens, width).collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn decode_masks_keep_the_prefill_pads_masked() {
        // After a left-padded prefill of lengths [3, 1] (pads [0, 2]) one step sees 4 columns.
        let mut mask = vec![-1; 8];
        fill_decode_mask(&[0, 2], 4, &mut mask);
        assert_eq!(mask, vec![1, 1, 1, 1, 0, 0, 1, 1]);
    }

    #[test]
    fn encodes_each_index_type() {
        let mut out = [0u8; 16];
        assert_eq!(encode(ElemType::I32, &[7, 50256], &mut out), 8);
        assert_eq!(&out[..8], &[7i32.to_ne_bytes(), 50256i32.to_ne_bytes()].concat()[..]);
        assert_eq!(encode(ElemType::I64, &[50256, 1], &mut out), 16);
        assert_eq!(i64::from_ne_bytes(out[..8].try_into().unwrap()), 50256);
        assert_eq!(encode(ElemType::F32, &[1, 0], &mut out), 8);
        assert_eq!(f32::from_ne_bytes(out[..4].try_into().unwrap()), 1.0);
    }

    #[test]
    fn decodes_float16_and_float32_logits() {
        let halves: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| half::f16::from_f32(*v).to_ne_bytes()).collect();
        let mut out = [0.0; 2];
        decode_logits(ElemType::F16, &halves, &mut out);
        assert_eq!(out, [1.5, -2.0]);
        let singles: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        decode_logits(ElemType::F32, &singles, &mut out);
        assert_eq!(out, [0.25, 3.0]);
    }
}
