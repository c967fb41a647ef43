// Everything in this target is in the header; this file gives SwiftPM a
// compilation unit.
#include "ctunnel.h"
