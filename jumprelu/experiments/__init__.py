"""The packaged example experiments (`jumprelu train --config quickstart`, `jumprelu sweep
smollm2_pareto`). Each file has get_config(arg) and usually get_sweep(arg); they are loaded by
path (`jumprelu.launch.experiment`), not imported as modules of this package."""
