"""The ops of :mod:`visattn.kernels`, one module each (public function, autograd, ``torch.library``
registration), with backend dispatch (``_dispatch``) and argument checks (``_checks``). Import the ops
from :mod:`visattn.kernels`."""
