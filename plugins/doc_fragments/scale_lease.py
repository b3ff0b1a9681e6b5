# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fencing option of the modules that act under the autoscaler's lease."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  lease:
    description:
      - Fencing. The autoscaler's lease (M(mlfleet.serving.scale_lease)) that the run acting here holds. Before it acts, the
        module checks that O(lease.holder) still holds a live lease in O(lease.path), and fails without acting when not
        (the run stalled past the lease's ttl and another run took it over), so two runs never act at once.
      - Not checked in check mode, which acts on nothing.
    type: dict
    suboptions:
      path:
        description: The lease file on the host running the module (the inventory's C(mlfleet_autoscale.lease.path)).
        type: path
        required: true
      holder:
        description: The holder id M(mlfleet.serving.scale_lease) returned when the run took the lease.
        type: str
        required: true
"""
