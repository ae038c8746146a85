"""The names the CDI options accept, as the NVIDIA container toolkit (and so the official plugin) spells them.

`--cdi-feature-flags` takes the toolkit's feature flag names; anything else is a config error, so
a typo does not silently change the spec. `--cdi-disable-hooks` takes hook names or `all`; the
official plugin passes unknown names through without a word, so nvdp warns instead of exiting
(a config that works there must not crash-loop here).
"""

from __future__ import annotations

from collections.abc import Iterable

# The toolkit's nvcdi feature flags. Only the first changes what nvdp writes; the others are
# accepted for compatibility and documented as having no effect (docs/cdi.md).
NO_ADDITIONAL_GIDS = "no-additional-gids-for-device-nodes"
EXPLICIT_DRIVER_LIBRARIES = "enable-explicit-driver-libraries"
FEATURE_FLAGS = (
    NO_ADDITIONAL_GIDS,
    EXPLICIT_DRIVER_LIBRARIES,
    "disable-nvsandbox-utils",
    "enable-coherent-annotations",
    "disable-multiple-csv-devices",
)

# createContainer hooks of the generated spec, in the order they appear.
CREATE_SYMLINKS = "create-symlinks"
ENABLE_CUDA_COMPAT = "enable-cuda-compat"
UPDATE_LDCACHE = "update-ldcache"
DISABLE_DEVICE_NODE_MODIFICATION = "disable-device-node-modification"
UPDATE_APPLICATION_PROFILE = "update-application-profile"
HOOKS = (CREATE_SYMLINKS, ENABLE_CUDA_COMPAT, UPDATE_LDCACHE, DISABLE_DEVICE_NODE_MODIFICATION,
         UPDATE_APPLICATION_PROFILE)
ALL_HOOKS = "all"
# Hook names the toolkit knows that nvdp never writes: disabling them is valid and changes nothing.
OTHER_KNOWN_HOOKS = ("chmod", "create-soname-symlinks")


def unknown_hooks(names: Iterable[str]) -> list[str]:
    """The --cdi-disable-hooks entries that name no hook (they disable nothing)."""
    known = {*HOOKS, *OTHER_KNOWN_HOOKS, ALL_HOOKS}
    return [n for n in names if n not in known]
