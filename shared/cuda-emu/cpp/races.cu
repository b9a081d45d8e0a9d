// Kernels with a mistake on purpose, emulated only, for the emulator's own tests (src/lib.rs):
// races the ThreadSanitizer build must report (`races_are_reported`), a read past a buffer the
// AddressSanitizer build must report (`out_of_bounds_is_reported`), and a block's threads at
// different __syncthreads (`divergent_syncthreads_aborts`).

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

// Half the block at one __syncthreads, half at another.
extern "C" __global__ void emu_divergent_syncthreads(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// Each thread reads its right neighbour's element: the last one reads past the buffer.
extern "C" __global__ void emu_out_of_bounds(float* out) {
  const float right = out[threadIdx.x + 1];
  __syncthreads();
  out[threadIdx.x] = right;
}
