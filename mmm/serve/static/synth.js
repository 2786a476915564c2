// A small General MIDI-ish synthesizer on the Web Audio API: no sample download, no soundfont.
// Pitched programs map to a few oscillator voices by GM family (piano, organ, guitar, bass,
// strings, brass/reeds, leads); drums (channel 10) are synthesized: kick, snare, toms, hats,
// cymbals. It is meant to let a musician judge notes and rhythm, not to sound like a sampler.
"use strict";

class Synth {
  constructor(ctx) {
    this.ctx = ctx;
    this.master = ctx.createGain();
    this.master.gain.value = 0.5;
    const comp = ctx.createDynamicsCompressor();
    this.master.connect(comp);
    comp.connect(ctx.destination);
    this.voices = new Set();  // live sources, stopped by stopAll()
    const len = ctx.sampleRate;  // one second of white noise, shared by the drums
    this.noise = ctx.createBuffer(1, len, ctx.sampleRate);
    const data = this.noise.getChannelData(0);
    let seed = 12345;
    for (let i = 0; i < len; i++) {  // a fixed LCG: the same noise every time
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      data[i] = (seed / 0x3fffffff) - 1;
    }
  }

  static family(program) {
    if (program < 8) return "piano";
    if (program < 16) return "mallet";
    if (program < 24) return "organ";
    if (program < 32) return "guitar";
    if (program < 40) return "bass";
    if (program < 56) return "strings";
    if (program < 80) return "wind";
    return "lead";
  }

  _track(node, end) {
    this.voices.add(node);
    node.onended = () => this.voices.delete(node);
    node.stop(end);
  }

  // One note: start time (AudioContext seconds), duration (s), MIDI pitch, velocity, program (-1 = drums).
  note(when, dur, pitch, velocity, program) {
    if (program < 0) return this.drum(when, pitch, velocity);
    const ctx = this.ctx, fam = Synth.family(program);
    const freq = 440 * Math.pow(2, (pitch - 69) / 12);
    const peak = 0.25 * (velocity / 127);
    const shape = {
      piano: ["triangle", 0.005, 1.2, 0.0], mallet: ["sine", 0.002, 0.6, 0.0], organ: ["square", 0.01, 0, 0.6],
      guitar: ["sawtooth", 0.003, 0.8, 0.0], bass: ["triangle", 0.005, 0.5, 0.5], strings: ["sawtooth", 0.08, 0, 0.8],
      wind: ["square", 0.04, 0, 0.7], lead: ["sawtooth", 0.01, 0, 0.7],
    }[fam];
    const [type, attack, decay, sustain] = shape;
    const osc = ctx.createOscillator();
    osc.type = type;
    osc.frequency.value = freq;
    const filter = ctx.createBiquadFilter();
    filter.type = "lowpass";
    filter.frequency.value = Math.min(12000, freq * (fam === "organ" ? 4 : 6));
    const gain = ctx.createGain();
    const end = when + Math.max(0.05, dur);
    const release = 0.08;
    gain.gain.setValueAtTime(0, when);
    gain.gain.linearRampToValueAtTime(peak, when + attack);
    if (decay > 0) {  // plucked/struck: decays whatever the note length
      gain.gain.setTargetAtTime(peak * sustain, when + attack, decay / 3);
    } else {  // sustained: settle to the sustain level and hold
      gain.gain.linearRampToValueAtTime(peak * sustain, when + attack + 0.1);
    }
    gain.gain.setTargetAtTime(0, end, release / 3);  // release at the note's end
    osc.connect(filter);
    filter.connect(gain);
    gain.connect(this.master);
    osc.start(when);
    this._track(osc, end + release * 2);
  }

  drum(when, pitch, velocity) {
    const ctx = this.ctx, v = 0.5 * (velocity / 127);
    const noise = (dur, type, freq, level) => {
      const src = ctx.createBufferSource();
      src.buffer = this.noise;
      const f = ctx.createBiquadFilter();
      f.type = type;
      f.frequency.value = freq;
      const g = ctx.createGain();
      g.gain.setValueAtTime(level, when);
      g.gain.exponentialRampToValueAtTime(0.001, when + dur);
      src.connect(f);
      f.connect(g);
      g.connect(this.master);
      src.start(when, Math.random() * 0.5);
      this._track(src, when + dur);
    };
    const tone = (dur, from, to, level) => {
      const osc = ctx.createOscillator();
      osc.frequency.setValueAtTime(from, when);
      osc.frequency.exponentialRampToValueAtTime(to, when + dur);
      const g = ctx.createGain();
      g.gain.setValueAtTime(level, when);
      g.gain.exponentialRampToValueAtTime(0.001, when + dur);
      osc.connect(g);
      g.connect(this.master);
      osc.start(when);
      this._track(osc, when + dur);
    };
    if (pitch === 35 || pitch === 36) tone(0.35, 150, 45, v * 1.6);  // kick
    else if (pitch === 38 || pitch === 40 || pitch === 37 || pitch === 39) {  // snare, rim, clap
      noise(0.18, "bandpass", 1800, v);
      tone(0.1, 220, 160, v * 0.6);
    } else if ([41, 43, 45, 47, 48, 50].includes(pitch)) tone(0.3, 60 + (pitch - 41) * 12, 50 + (pitch - 41) * 8, v);
    else if (pitch === 42 || pitch === 44) noise(0.05, "highpass", 7000, v * 0.6);  // closed / pedal hat
    else if (pitch === 46) noise(0.3, "highpass", 7000, v * 0.6);  // open hat
    else if ([49, 51, 52, 53, 55, 57, 59].includes(pitch)) noise(1.2, "highpass", 5000, v * 0.5);  // cymbals
    else noise(0.1, "bandpass", 3000, v * 0.5);  // percussion
  }

  stopAll() {
    for (const node of this.voices) {
      try { node.stop(); } catch (e) { /* already stopped */ }
    }
    this.voices.clear();
  }
}

window.Synth = Synth;
