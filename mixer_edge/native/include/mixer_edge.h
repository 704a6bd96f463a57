/* mixer-edge native runtime: load a compiled MLP-Mixer artifact and classify images, without Python.
 *
 * An artifact directory (written by `mixer-edge compile`) is checked exactly as the Python loader checks it,
 * before any of its code is loaded: the format version, the manifest's own digest, the sha256 of every file,
 * the architecture of model.so and the CPU features it needs, (WGSL artifacts) the Vulkan device's features,
 * or (cuda-driver artifacts) the CUDA driver's version and the GPU's architecture. Every function returns a status; on failure mixer_edge_last_error() holds one line that names the
 * file or field and the fix, in the same words as the Python loader. Nothing aborts.
 *
 * Threads: a model may be used by one thread at a time; open one model per thread to run in parallel. The
 * calling thread's TVM thread pool gets `num_threads` workers (0: one per physical core).
 */
#ifndef MIXER_EDGE_H_
#define MIXER_EDGE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MIXER_EDGE_API __declspec(dllexport)
#else
#define MIXER_EDGE_API __attribute__((visibility("default")))
#endif

#define MIXER_EDGE_FORMAT_VERSION 2 /* the artifact format this runtime reads */

typedef enum {
  MIXER_EDGE_OK = 0,
  MIXER_EDGE_INVALID_ARGUMENT = 1, /* a NULL pointer, a batch < 1, an index out of range */
  MIXER_EDGE_BAD_ARTIFACT = 2,     /* missing, edited, corrupt or forged artifact: copy it again or rebuild it */
  MIXER_EDGE_WRONG_DEVICE = 3,     /* built for another CPU/GPU than this one: rebuild for this device */
  MIXER_EDGE_UNSUPPORTED = 4,      /* a backend this library was built without */
  MIXER_EDGE_RUNTIME_ERROR = 5,    /* the device failed while running, or the logits were not finite */
} mixer_edge_status;

typedef struct mixer_edge_model mixer_edge_model;

typedef struct {
  int num_threads; /* CPU worker threads of the calling thread's pool; 0: one per physical core */
} mixer_edge_options;

/* How an image becomes the model's input: resize with `resample` (a PIL filter name: nearest, bilinear, bicubic,
 * lanczos, box, hamming) to height x width, or with crop_pct < 1 the shorter side to floor(side / crop_pct)
 * and then a center crop of height x width (timm's eval transform); scale pixels to [0, 1], then
 * (x - mean) / std. */
typedef struct {
  int channels;
  int height;
  int width;
  const float* mean; /* `channels` values */
  const float* std;  /* `channels` values */
  const char* resample;
  double crop_pct; /* in (0, 1]; 1: no crop (an artifact that does not say) */
} mixer_edge_preprocess;

/* One line: what failed for the last call on this thread that did not return MIXER_EDGE_OK ("" if none). */
MIXER_EDGE_API const char* mixer_edge_last_error(void);

/* The version of this runtime ("0.x.y"), and the backends it was built with ("cpu wgpu cuda-driver"). */
MIXER_EDGE_API const char* mixer_edge_version(void);
MIXER_EDGE_API const char* mixer_edge_backends(void);

/* Check and load the artifact directory `path`; options may be NULL (defaults). */
MIXER_EDGE_API mixer_edge_status mixer_edge_open(const char* path, const mixer_edge_options* options,
                                                 mixer_edge_model** model);
MIXER_EDGE_API void mixer_edge_close(mixer_edge_model* model);

/* The input is float32 NCHW: shape[0] is the compiled batch (mixer_edge_run takes any count of images). */
MIXER_EDGE_API void mixer_edge_input_shape(const mixer_edge_model* model, int64_t shape[4]);
MIXER_EDGE_API int mixer_edge_num_classes(const mixer_edge_model* model);
/* Class `index`'s label (NULL when out of range); valid until the model is closed. */
MIXER_EDGE_API const char* mixer_edge_label(const mixer_edge_model* model, int index);
MIXER_EDGE_API const mixer_edge_preprocess* mixer_edge_preprocessing(const mixer_edge_model* model);
/* The backend that runs it ("cpu", "wgpu", "cuda-driver") and the device, in words. */
MIXER_EDGE_API const char* mixer_edge_backend(const mixer_edge_model* model);
MIXER_EDGE_API const char* mixer_edge_device(const mixer_edge_model* model);

/* Logits of `count` preprocessed images: `input` holds count x C x H x W float32, `logits` receives
 * count x num_classes float32. Logits that are not finite are an error, never returned. */
MIXER_EDGE_API mixer_edge_status mixer_edge_run(mixer_edge_model* model, const float* input, int64_t count,
                                                float* logits);

#ifdef __cplusplus
}
#endif

#endif /* MIXER_EDGE_H_ */
