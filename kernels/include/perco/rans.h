/* PerCo Engine CUDA entropy coding: batched rANS over many independent streams.
 *
 * Stream format: constriction's AnsCoder (64-bit state, 32-bit words, 24-bit probabilities),
 * bit-exact with the CPU coder (docs/entropy-coding.md). Every stream is a uint32 word array;
 * symbols are decoded in order; the encoder pushes words in the order constriction does.
 *
 * Conventions of every entry point:
 *  - all pointers are device pointers unless the name ends in _host;
 *  - work is enqueued on `stream` (0 = the legacy default stream); nothing synchronizes
 *    except the *_host helpers;
 *  - the size contract of every pointer is written next to it; N = num_streams,
 *    S = symbol_offsets[N] (total symbols), K = num_symbols, W = word_offsets[N];
 *  - per-stream problems are reported in `status`, never by a crash or an out-of-bounds access;
 *    work per stream is bounded by its symbol count.
 */
#ifndef PERCO_RANS_H
#define PERCO_RANS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PERCO_PROB_BITS 24

/* Per-stream decode status. */
typedef enum {
  PERCO_STREAM_OK = 0,
  PERCO_STREAM_CORRUPT = 1,   /* ends in a zero word, or words left over after the last symbol */
  PERCO_STREAM_TRUNCATED = 2, /* all words consumed but the coder state did not return to empty */
} perco_stream_status;

/* Call result. */
typedef enum {
  PERCO_OK = 0,
  PERCO_ERR_INVALID_ARGUMENT = 1, /* K outside 2..65536, null pointer where one is required, ... */
  PERCO_ERR_CUDA = 2,             /* a CUDA call failed; cudaGetLastError() tells which */
} perco_result;

typedef enum {
  PERCO_TABLE_UNIFORM = 0,    /* f[i] = floor(2^24/K), remainder on f[K-1]; `cdf` unused */
  PERCO_TABLE_STATIC = 1,     /* one table per stream: cdf row table_index[stream] (row 0 if NULL) */
  PERCO_TABLE_PER_SYMBOL = 2, /* one table per symbol: cdf row = the symbol's position in [0, S) */
} perco_table_kind;

/* A model. A cdf row has K + 1 entries: cdf[0] = 0, cdf[K] = 2^24, f[i] = cdf[i+1] - cdf[i] >= 1. */
typedef struct {
  perco_table_kind kind;
  uint32_t num_symbols;         /* K, 2..65536 */
  const uint32_t* cdf;          /* STATIC: [num_tables * (K+1)]; PER_SYMBOL: [S * (K+1)] */
  const uint32_t* table_index;  /* STATIC only: [N] row per stream, or NULL */
} perco_model;

/* Decode N streams.
 * words          [W]      concatenated streams; stream i is words[word_offsets[i] .. word_offsets[i+1])
 * word_offsets   [N + 1]  non-decreasing
 * symbol_offsets [N + 1]  non-decreasing; stream i yields symbols[symbol_offsets[i] .. symbol_offsets[i+1])
 * symbols        [S]      output, int32 in [0, K)
 * status         [N]      output, perco_stream_status
 * No scratch memory is needed. The same as perco_rans_decode_split with splits = 1. */
perco_result perco_rans_decode(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                               const uint64_t* symbol_offsets, uint32_t num_streams, int32_t* symbols,
                               int32_t* status, cudaStream_t stream);

/* Encode N streams.
 * symbols        [S]      input, each in [0, K) (an out-of-range symbol marks its stream CORRUPT)
 * symbol_offsets [N + 1]  as for decode
 * words          [S + 2N] output; stream i is written at words[symbol_offsets[i] + 2 i ...]
 *                          (capacity n_i + 2 words: one word per symbol at most, plus the state)
 * word_counts    [N]      output, words of stream i (trailing zero words trimmed, as constriction)
 * status         [N]      output, OK or CORRUPT
 * No scratch memory is needed: each stream's capacity region is its scratch. The same as
 * perco_rans_encode_split with splits = 1. */
perco_result perco_rans_encode(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                               uint32_t num_streams, uint32_t* words, uint32_t* word_counts, int32_t* status,
                               cudaStream_t stream);

/* --- split streams: one symbol sequence coded as P independent streams ---------------------
 * Sequence q (N sequences, symbols[symbol_offsets[q] .. symbol_offsets[q+1]), n_q of them) is coded
 * as P = `splits` sub-streams, P >= 1, N * P < 2^32: symbol t of the sequence (t = 0 .. n_q - 1)
 * goes to sub-stream t mod P, which is an ordinary stream of the format above holding symbols
 * t = j, j + P, j + 2P, ... (ceil((n_q - j) / P) of them, 0 when j >= n_q), so the CPU coder
 * decodes each on its own. Sub-stream j of sequence q is stream q P + j of `words` /
 * `word_offsets` / `word_counts` / `status` (N P entries). One GPU thread per sub-stream.
 * Models: PER_SYMBOL rows are indexed by the symbol's position in [0, S) as ever; STATIC
 * table_index has one entry per sequence (N). docs/entropy-coding.md, "GPU kernels", gives the
 * format consequence (a container stores P and each sub-stream's word count). */
perco_result perco_rans_decode_split(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                                     const uint64_t* symbol_offsets, uint32_t num_sequences, uint32_t splits,
                                     int32_t* symbols, int32_t* status, cudaStream_t stream);

/* words       [S + 2 N P] output; sub-stream (q, j) is written at
 *                          symbol_offsets[q] + 2 (q P + j) + j floor(n_q / P) + min(j, n_q mod P)
 *                          (capacity: its symbol count + 2 words)
 * word_counts [N P] output; status [N P] output, OK or CORRUPT (an out-of-range symbol: every
 * sub-stream of that sequence holding one is CORRUPT, with 0 words). */
perco_result perco_rans_encode_split(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                                     uint32_t num_sequences, uint32_t splits, uint32_t* words,
                                     uint32_t* word_counts, int32_t* status, cudaStream_t stream);

/* --- resumable decode: symbols in chunks, the coder state kept on the device ----------------
 * For decoders whose tables for the next symbols depend on the symbols decoded so far (the
 * learned entropy model: group g's tables come from groups < g). Decoding a sequence in chunks
 * (any chunk sizes summing to n_q, including empty chunks) gives exactly the symbols and final
 * statuses of one perco_rans_decode_split call.
 *   perco_rans_decode_begin     reads the top words of each (sub-)stream into its state
 *   perco_rans_decode_continue  decodes the next chunk, any number of times
 *   perco_rans_decode_end       the final status of each (sub-)stream
 * The words must stay unchanged on the device between the calls. */
typedef struct {
  uint64_t head;      /* the coder state */
  uint64_t unread;    /* words [0, unread) of the stream are still to be read (from the top) */
  uint64_t position;  /* symbols of the sequence decoded by earlier calls */
  int32_t status;     /* PERCO_STREAM_OK, or PERCO_STREAM_CORRUPT (the stream ends in a zero word) */
  uint32_t reserved;
} perco_stream_state;

/* states [N P] output. */
perco_result perco_rans_decode_begin(const uint32_t* words, const uint64_t* word_offsets, uint32_t num_sequences,
                                     uint32_t splits, perco_stream_state* states, cudaStream_t stream);

/* The chunk: chunk_offsets [N + 1] (non-decreasing) gives sequence q the chunk symbols
 * symbols[chunk_offsets[q] .. chunk_offsets[q+1]); NULL: every sequence gets `chunk_count`, sequence
 * q at q * chunk_count. The model's PER_SYMBOL rows are indexed by the position in this chunk's
 * symbol array, STATIC table_index by sequence. A sub-stream of a CORRUPT state yields zeros.
 * Continuing past a sequence's symbols is not an error: the decoder keeps popping (the end
 * status then says what happened, as for a too-large symbol count in perco_rans_decode). */
perco_result perco_rans_decode_continue(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                                        const uint64_t* chunk_offsets, uint64_t chunk_count, uint32_t num_sequences,
                                        uint32_t splits, perco_stream_state* states, int32_t* symbols,
                                        cudaStream_t stream);

/* status [N P] output, as perco_rans_decode's. */
perco_result perco_rans_decode_end(const perco_stream_state* states, uint32_t num_streams, int32_t* status,
                                   cudaStream_t stream);

/* --- tables ------------------------------------------------------------------------------ */

/* Integer tables from model outputs, the procedure of docs/entropy-coding.md, bit-exact with numpy.
 * values   [rows * K] float32 logits (from_logits = 1) or probabilities (from_logits = 0), row-major
 * cdf      [rows * (K+1)] output
 * scratch  [rows * K] uint64 caller-provided scratch (the integer weights) */
perco_result perco_tables_from_values(const float* values, uint32_t rows, uint32_t num_symbols, int from_logits,
                                      uint32_t* cdf, uint64_t* scratch, cudaStream_t stream);

/* Integer tables from integer logit steps, bit-exact with numpy's tables_from_steps
 * (engine/entropy/tables.py): each row shifted by its minimum, capped at 2^20 - 1, exp tables,
 * then the same integer normalisation as perco_tables_from_values. No scratch.
 * steps [rows * K] int64, row-major. numpy refuses a negative step; here every value is shifted
 * by the row minimum (a row's differences are exact in uint64), the same result for steps >= 0.
 * cdf   [rows * (K+1)] output */
perco_result perco_tables_from_steps(const int64_t* steps, uint32_t rows, uint32_t num_symbols, uint32_t* cdf,
                                     cudaStream_t stream);

/* One symbol per cdf row drawn by the hybrid-mode PRNG of docs/entropy-coding.md (learned.py's
 * sample_tables): row i draws u = splitmix64(seed + (group 2^32 + i + 1) 0x9E3779B97F4A7C15) >> 40
 * and takes s with cdf[s] <= u < cdf[s+1].
 * cdf [rows * (K+1)]; symbols [rows] output */
perco_result perco_sample_cdf(const uint32_t* cdf, uint32_t rows, uint32_t num_symbols, uint64_t seed,
                              uint64_t group, int32_t* symbols, cudaStream_t stream);

/* --- host helpers for bindings without a CUDA array library (ctypes) -----------------------
 * Same contracts, host pointers; they allocate, copy, run on a private stream and synchronize.
 * cdf_len / table_index_len are the element counts of model_host.cdf / .table_index. Checked on
 * the host first (PERCO_ERR_INVALID_ARGUMENT): offsets never decrease; PER_SYMBOL: cdf_len >=
 * S * (K+1) (S = 0 is valid: empty streams); STATIC: at least one row, and table_index, if given,
 * has N entries (one per sequence) naming existing rows; splits >= 1 and N * splits < 2^32. */
int perco_cuda_device_count(void);
perco_result perco_rans_decode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const uint32_t* words_host, const uint64_t* word_offsets_host,
                                    const uint64_t* symbol_offsets_host, uint32_t num_streams,
                                    int32_t* symbols_host, int32_t* status_host);
perco_result perco_rans_encode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const int32_t* symbols_host, const uint64_t* symbol_offsets_host,
                                    uint32_t num_streams, uint32_t* words_host, uint32_t* word_counts_host,
                                    int32_t* status_host);
/* word_offsets_host [N P + 1]; status_host [N P] */
perco_result perco_rans_decode_split_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                          const uint32_t* words_host, const uint64_t* word_offsets_host,
                                          const uint64_t* symbol_offsets_host, uint32_t num_sequences,
                                          uint32_t splits, int32_t* symbols_host, int32_t* status_host);
/* words_host [S + 2 N P] (the layout of perco_rans_encode_split); word_counts_host, status_host [N P] */
perco_result perco_rans_encode_split_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                          const int32_t* symbols_host, const uint64_t* symbol_offsets_host,
                                          uint32_t num_sequences, uint32_t splits, uint32_t* words_host,
                                          uint32_t* word_counts_host, int32_t* status_host);

/* A resumable decoder for ctypes: owns the device copy of the words, the states and scratch.
 *   perco_decoder_create_host  copies words_host [W] / word_offsets_host [N P + 1] to the device,
 *                              runs perco_rans_decode_begin; all its work runs on `stream` (0: the
 *                              legacy default stream, ordered with the device work of other
 *                              blocking streams; give the producer's stream otherwise)
 *   perco_decoder_decode_host  the next chunk with host tables (model_host as perco_rans_decode_host,
 *                              PER_SYMBOL: a row per symbol of the chunk)
 *   perco_decoder_decode_steps the next chunk with tables made on the device from int64 steps
 *                              [T * K] (T = the chunk's symbols), a device pointer (steps_on_device
 *                              = 1, read on `stream`) or a host one: perco_tables_from_steps, then
 *                              perco_rans_decode_continue
 *   perco_decoder_finish_host  status_host [N P] (perco_rans_decode_end); the decoder stays valid
 *   perco_decoder_destroy      frees everything (NULL: nothing)
 * The chunk: chunk_counts_host [N] symbols per sequence, or NULL for chunk_count each. Output:
 * symbols_host [T] and/or symbols_device [T] (device int32; either may be NULL); each call
 * synchronizes `stream` before it returns, so only the T symbols cross to the host. */
typedef struct perco_decoder perco_decoder;
perco_result perco_decoder_create_host(const uint32_t* words_host, const uint64_t* word_offsets_host,
                                       uint32_t num_sequences, uint32_t splits, cudaStream_t stream,
                                       perco_decoder** decoder);
perco_result perco_decoder_decode_host(perco_decoder* decoder, perco_model model_host, size_t cdf_len,
                                       size_t table_index_len, const uint64_t* chunk_counts_host, uint64_t chunk_count,
                                       int32_t* symbols_host, int32_t* symbols_device);
perco_result perco_decoder_decode_steps(perco_decoder* decoder, const int64_t* steps, int steps_on_device,
                                        uint32_t num_symbols, const uint64_t* chunk_counts_host, uint64_t chunk_count,
                                        int32_t* symbols_host, int32_t* symbols_device);
perco_result perco_decoder_finish_host(perco_decoder* decoder, int32_t* status_host);
void perco_decoder_destroy(perco_decoder* decoder);

/* Tables from steps / sampling with host or device inputs and outputs (NULL outputs are skipped);
 * synchronous on `stream`. cdf_host / cdf_device [rows * (K+1)]. */
perco_result perco_tables_from_steps_host(const int64_t* steps, int steps_on_device, uint32_t rows,
                                          uint32_t num_symbols, uint32_t* cdf_host, uint32_t* cdf_device,
                                          cudaStream_t stream);
/* The hybrid draw from steps: perco_tables_from_steps then perco_sample_cdf; symbols [rows]. */
perco_result perco_sample_steps_host(const int64_t* steps, int steps_on_device, uint32_t rows, uint32_t num_symbols,
                                     uint64_t seed, uint64_t group, int32_t* symbols_host, int32_t* symbols_device,
                                     cudaStream_t stream);

/* --- device memory for bindings without a CUDA array library -------------------------------
 * Thin wrappers of cudaMalloc / cudaFree / cudaMemcpy (kind: 1 host to device, 2 device to host,
 * 3 device to device; synchronous) and cudaDeviceSynchronize. */
perco_result perco_device_alloc(size_t bytes, void** ptr);
perco_result perco_device_free(void* ptr);
perco_result perco_device_copy(void* dst, const void* src, size_t bytes, int kind);
perco_result perco_device_synchronize(void);
/* Device memory bandwidth: `repeats` device-to-device copies of `bytes`, after one warm-up copy,
 * timed on the host around a synchronized stream; *bytes_per_second counts read + written bytes
 * (2 bytes per byte copied). The emulation's figure is host memcpy speed and means nothing. */
perco_result perco_copy_bandwidth_host(size_t bytes, int repeats, double* bytes_per_second);

#ifdef __cplusplus
}
#endif
#endif /* PERCO_RANS_H */
