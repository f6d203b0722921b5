import type { Architecture } from '../architecture.js';

/**
 * RoPE inverse frequencies and the factor on cos/sin, per scaling kind, with the semantics of
 * transformers' `modeling_rope_utils.py` (`_compute_*_parameters`). All of these are static
 * tables: they depend on the configuration only ("dynamic" NTK, whose table depends on the
 * sequence length, is refused when config.json is read). LongRoPE has two static tables and the
 * graph picks one per row and step.
 */
export interface RopeFrequencies {
  /** one per rotated pair, float32-rounded as torch holds `inv_freq` */
  invFreq: Float32Array;
  /** multiplies cos and sin (YaRN's and LongRoPE's attention factor; 1 elsewhere) */
  attentionFactor: number;
  /** LongRoPE only: the table for steps whose sequence is longer than the original context */
  longInvFreq?: Float32Array;
}

export function ropeFrequencies(a: Architecture): RopeFrequencies {
  const dim = a.headDim;
  const half = dim / 2;
  // transformers: 1 / base ** (arange(0, dim, 2) / dim), each step in float32
  const plain = Array.from({ length: half }, (_, i) => Math.fround(1 / Math.fround(Math.pow(a.ropeTheta, Math.fround((2 * i) / dim)))));
  const s = a.rope;
  if (!s) return { invFreq: Float32Array.from(plain), attentionFactor: 1 };
  switch (s.type) {
    case 'linear':
      return { invFreq: Float32Array.from(plain, (f) => f / s.factor), attentionFactor: 1 };
    case 'llama3': {
      // wavelengths shorter than original/high_freq_factor keep their frequency, longer than
      // original/low_freq_factor are divided by factor, and those between are blended smoothly
      const lowWavelen = s.originalMaxPositions / s.lowFreqFactor;
      const highWavelen = s.originalMaxPositions / s.highFreqFactor;
      const inv = plain.map((f) => {
        const wavelen = (2 * Math.PI) / f;
        if (wavelen < highWavelen) return f;
        if (wavelen > lowWavelen) return f / s.factor;
        const smooth = (s.originalMaxPositions / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        return (1 - smooth) * (f / s.factor) + smooth * f;
      });
      return { invFreq: Float32Array.from(inv), attentionFactor: 1 };
    }
    case 'yarn': {
      // dimensions that rotate more than beta_fast times over the original context extrapolate
      // (keep their frequency), fewer than beta_slow interpolate (divided by factor), a linear ramp between
      const correctionDim = (rotations: number) => (dim * Math.log(s.originalMaxPositions / (rotations * 2 * Math.PI))) / (2 * Math.log(a.ropeTheta));
      let low = correctionDim(s.betaFast);
      let high = correctionDim(s.betaSlow);
      if (s.truncate) {
        low = Math.floor(low);
        high = Math.ceil(high);
      }
      low = Math.max(low, 0);
      high = Math.min(high, dim - 1);
      if (low === high) high += 0.001;
      const inv = plain.map((_, i) => {
        const posFreq = Math.fround(Math.pow(a.ropeTheta, Math.fround((2 * i) / dim)));
        const extrapolation = 1 / posFreq;
        const interpolation = 1 / (s.factor * posFreq);
        const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
        const extrapolationWeight = 1 - ramp;
        return interpolation * (1 - extrapolationWeight) + extrapolation * extrapolationWeight;
      });
      return { invFreq: Float32Array.from(inv), attentionFactor: s.attentionFactor };
    }
    case 'longrope': {
      // transformers: 1 / (ext_factors * base ** (arange(0, dim, 2) / dim)), in float32
      const scaled = (ext: readonly number[]) => Float32Array.from(plain, (_, i) => 1 / Math.fround(Math.fround(ext[i]!) * Math.fround(Math.pow(a.ropeTheta, Math.fround((2 * i) / dim)))));
      return { invFreq: scaled(s.shortFactor), longInvFreq: scaled(s.longFactor), attentionFactor: s.attentionFactor };
    }
  }
}
