/* An emulated NVML (libnvidia-ml.so.1): the GPUs of the emulated CUDA driver
 * (cuda.c), as pynvml reads them. Memory in use and the processes using it
 * are what /proc shows of the driver's allocations (emulated.h). */
#include "emulated.h"

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_NOT_SUPPORTED 3

typedef struct {
  unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

static int initialised;
static int handles[EMU_MAX_DEVICES];

static int device_of(nvmlDevice_t device) {
  int *at = (int *)device;
  if (!initialised || at < handles || at >= handles + emu_devices()) return -1;
  return (int)(at - handles);
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
  (void)flags;
  if (emu_devices() == 0) return NVML_ERROR_DRIVER_NOT_LOADED;
  initialised = 1;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  initialised = 0;
  return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
  switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
  }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  snprintf(version, length, "emulated");
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  *count = (unsigned int)emu_devices();
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  if (index >= (unsigned int)emu_devices()) return NVML_ERROR_INVALID_ARGUMENT;
  *device = &handles[index];
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
  if (device_of(device) < 0) return NVML_ERROR_INVALID_ARGUMENT;
  snprintf(name, length, "Torpor emulated GPU");
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
  int d = device_of(device);
  if (d < 0) return NVML_ERROR_INVALID_ARGUMENT;
  unsigned char b[16];
  emu_uuid(d, b);
  snprintf(uuid, length,
           "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
           b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
           b[15]);
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
  int d = device_of(device);
  if (d < 0) return NVML_ERROR_INVALID_ARGUMENT;
  memory->total = emu_total();
  memory->used = emu_used(d, NULL, NULL, NULL);
  memory->free = memory->used > memory->total ? 0 : memory->total - memory->used;
  return NVML_SUCCESS;
}

static nvmlReturn_t pcie(nvmlDevice_t device, unsigned int *value, unsigned int figure) {
  if (device_of(device) < 0) return NVML_ERROR_INVALID_ARGUMENT;
  *value = figure;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t device, unsigned int *v) {
  return pcie(device, v, 5);
}
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t device, unsigned int *v) {
  return pcie(device, v, 5);
}
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t device, unsigned int *v) {
  return pcie(device, v, 16);
}
nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(nvmlDevice_t device, unsigned int *v) {
  return pcie(device, v, 16);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
  int d = device_of(device);
  if (d < 0 || !count) return NVML_ERROR_INVALID_ARGUMENT;
  int pids[EMU_MAX_PIDS], n = 0;
  unsigned long long bytes[EMU_MAX_PIDS];
  emu_used(d, pids, bytes, &n);
  if (!infos || *count < (unsigned int)n) {
    *count = (unsigned int)n;
    return n ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
  }
  for (int i = 0; i < n; i++)
    infos[i] = (nvmlProcessInfo_t){(unsigned int)pids[i], bytes[i], 0xffffffffu, 0xffffffffu};
  *count = (unsigned int)n;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
  (void)infos;
  if (device_of(device) < 0 || !count) return NVML_ERROR_INVALID_ARGUMENT;
  *count = 0;
  return NVML_SUCCESS;
}
