/* For tests (libcudaemu-used.so): bytes in use on a device of an emulated
 * node, as the emulated driver and NVML would report them to a process of
 * that node. A library of its own, so a test process that asks loads no
 * libcuda.so.1 or libnvidia-ml.so.1 (they would stand in for the real ones). */
#include "emulated.h"

unsigned long long cudaemu_used(const char *node, int device) {
  return emu_used_on(node, device, NULL, NULL, NULL);
}
