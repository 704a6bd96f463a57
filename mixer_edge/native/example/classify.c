/* classify: the smallest program on the mixer-edge C API.
 *
 *   classify ARTIFACT INPUT
 *
 * INPUT holds preprocessed images as float32 NCHW (C x H x W as the artifact's input): a .npy file
 * (little-endian float32, C order, as numpy.save writes it), or raw float32 values with no header.
 * Prints the most likely label of each image, one line each; on failure prints mixer_edge_last_error() and
 * exits 1.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mixer_edge.h"

/* Reads `path` whole; returns its bytes (free them) and their count in `size`, or NULL. */
static unsigned char* read_file(const char* path, size_t* size) {
  FILE* f = fopen(path, "rb");
  unsigned char* data = NULL;
  long end;
  if (f == NULL) return NULL;
  if (fseek(f, 0, SEEK_END) == 0 && (end = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
    data = malloc(end > 0 ? (size_t)end : 1);
    if (data != NULL && fread(data, 1, (size_t)end, f) != (size_t)end) {
      free(data);
      data = NULL;
    }
    *size = (size_t)end;
  }
  fclose(f);
  return data;
}

/* Where the float32 values of a .npy file start (0 for raw float32); -1 if it is a .npy of something else. */
static long npy_data_offset(const unsigned char* data, size_t size) {
  size_t header_len, start;
  if (size < 10 || memcmp(data, "\x93NUMPY", 6) != 0) return 0;
  if (data[6] == 1) {
    header_len = data[8] | (size_t)data[9] << 8;
    start = 10;
  } else {
    if (size < 12) return -1;
    header_len = data[8] | (size_t)data[9] << 8 | (size_t)data[10] << 16 | (size_t)data[11] << 24;
    start = 12;
  }
  if (start + header_len > size) return -1;
  {
    char header[512] = {0};
    memcpy(header, data + start, header_len < sizeof header - 1 ? header_len : sizeof header - 1);
    if (strstr(header, "'descr': '<f4'") == NULL || strstr(header, "'fortran_order': False") == NULL) return -1;
  }
  return (long)(start + header_len);
}

int main(int argc, char** argv) {
  mixer_edge_model* model = NULL;
  unsigned char* data = NULL;
  float* logits = NULL;
  size_t size = 0, image_bytes;
  int64_t shape[4], count, i;
  long offset;
  int classes, status = 1;

  if (argc != 3) {
    fprintf(stderr, "usage: %s ARTIFACT INPUT.npy|INPUT.f32 (float32 NCHW images, preprocessed)\n", argv[0]);
    return 2;
  }
  if (mixer_edge_open(argv[1], NULL, &model) != MIXER_EDGE_OK) {
    fprintf(stderr, "classify: %s\n", mixer_edge_last_error());
    return 1;
  }
  mixer_edge_input_shape(model, shape);
  classes = mixer_edge_num_classes(model);
  image_bytes = (size_t)(shape[1] * shape[2] * shape[3]) * sizeof(float);
  data = read_file(argv[2], &size);
  offset = data != NULL ? npy_data_offset(data, size) : -1;
  if (data == NULL || offset < 0 || (size - (size_t)offset) % image_bytes != 0 || size == (size_t)offset) {
    fprintf(stderr, "classify: %s is not float32 images of %lld x %lld x %lld (a .npy or raw float32)\n", argv[2],
            (long long)shape[1], (long long)shape[2], (long long)shape[3]);
    goto done;
  }
  count = (int64_t)((size - (size_t)offset) / image_bytes);
  logits = malloc((size_t)count * (size_t)classes * sizeof(float));
  if (logits == NULL) {
    fprintf(stderr, "classify: out of memory for %lld images\n", (long long)count);
    goto done;
  }
  /* malloc'd memory is aligned for float, and a .npy header pads the data to a multiple of 16 bytes */
  if (mixer_edge_run(model, (const float*)(data + offset), count, logits) != MIXER_EDGE_OK) {
    fprintf(stderr, "classify: %s\n", mixer_edge_last_error());
    goto done;
  }
  for (i = 0; i < count; i++) {
    const float* row = logits + i * classes;
    int best = 0, c;
    for (c = 1; c < classes; c++)
      if (row[c] > row[best]) best = c;
    printf("%s\n", mixer_edge_label(model, best));
  }
  status = 0;
done:
  free(logits);
  free(data);
  mixer_edge_close(model);
  return status;
}
