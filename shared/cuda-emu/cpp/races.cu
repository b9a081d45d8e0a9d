// Kernels with a race on purpose, emulated only: the test that the ThreadSanitizer build of the
// emulator reports the two kinds of race a GPU has (src/lib.rs, `races_are_reported`).

// Every block adds to the same element without an atomic.
extern "C" __global__ void emu_race_between_blocks(float* out) {
  if (threadIdx.x == 0) out[0] += 1.0f;
}

// Each thread reads its neighbour's element of shared memory with no barrier after the writes.
extern "C" __global__ void emu_race_without_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// As above with a shuffle between the writes and the reads: a shuffle exchanges registers and
// orders no memory (only __syncwarp and __syncthreads do).
extern "C" __global__ void emu_race_across_shuffle(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  const float one = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  out[threadIdx.x] = s[threadIdx.x ^ 1] * one;
}
