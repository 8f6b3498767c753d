//! Rotary position embedding tables, computed the way transformers computes them (in f32), with
//! the linear and Llama 3 frequency scalings.

use super::config::{RopeConfig, RopeScaling};

/// The inverse frequencies `theta^(-2i/d)` for `i < d/2`, after scaling.
pub fn inverse_frequencies(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / rope.theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::PerFrequency { ref divisors } => base.into_iter().zip(divisors).map(|(f, d)| f / d).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            // Wavelengths longer than the original context divided by `low_freq_factor` are slowed
            // down by `factor`; those shorter than it divided by `high_freq_factor` are kept; the
            // band in between is interpolated smoothly.
            let old_len = original_max_position_embeddings as f32;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

/// `[max_positions, head_dim]`: for each position the cosines of its angles, then the sines.
pub fn cos_sin_table(rope: &RopeConfig, head_dim: usize, max_positions: usize) -> Vec<f32> {
    let inv_freq = inverse_frequencies(rope, head_dim);
    let half = head_dim / 2;
    let mut table = vec![0f32; max_positions * head_dim];
    for (pos, row) in table.chunks_exact_mut(head_dim).enumerate() {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            row[i] = angle.cos();
            row[half + i] = angle.sin();
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_slows_low_frequencies() {
        let plain = RopeConfig { theta: 500000.0, scaling: RopeScaling::None };
        let scaled = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let (a, b) = (inverse_frequencies(&plain, 128), inverse_frequencies(&scaled, 128));
        assert_eq!(a[0], b[0], "the highest frequency is untouched");
        assert!((b[63] - a[63] / 8.0).abs() <= f32::EPSILON * a[63], "the lowest frequency is divided by the factor");
        // Somewhere in the middle band the ratio lies strictly between 1 and 8.
        assert!(a.iter().zip(&b).any(|(x, y)| x / y > 1.01 && x / y < 7.99));
    }

    /// GGUF files store Llama 3.1's scaling as one divisor per frequency (`rope_freqs.weight`, what
    /// llama.cpp's converter computes as `base / scaled`): the same frequencies to rounding.
    #[test]
    fn per_frequency_divisors_reproduce_llama3_scaling() {
        let plain = RopeConfig { theta: 500000.0, scaling: RopeScaling::None };
        let llama3 = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let (base, scaled) = (inverse_frequencies(&plain, 64), inverse_frequencies(&llama3, 64));
        let divisors = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let stored = RopeConfig { theta: 500000.0, scaling: RopeScaling::PerFrequency { divisors } };
        for (a, b) in inverse_frequencies(&stored, 64).iter().zip(&scaled) {
            assert!((a - b).abs() <= 4.0 * f32::EPSILON * b, "{a} vs {b}");
        }
    }

    #[test]
    fn position_zero_is_the_identity() {
        let rope = RopeConfig { theta: 10000.0, scaling: RopeScaling::Linear { factor: 2.0 } };
        let table = cos_sin_table(&rope, 8, 3);
        assert_eq!(&table[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((table[8] - 0.5f32.cos()).abs() < 1e-7, "linear scaling halves the angle");
    }
}
