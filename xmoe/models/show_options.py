"""Print every option of the xmoe_encoder model and the xmoe_masked_lm criterion, with help.

    python -m xmoe.models.show_options --arch xmoe_tiny

fairseq-train's own --help stops before it adds the options of the chosen --arch and
--criterion (it parses --help on its first pass), so it cannot show them; this prints the same
options fairseq-train and Hydra configs accept, generated from the same dataclasses.
"""

import argparse
import sys

from fairseq.dataclass.utils import gen_parser_from_dataclass

from xmoe.criterions.xmoe_masked_lm import XMoEMaskedLmConfig
from xmoe.models.xmoe_encoder import ARCHITECTURES, XMoEEncoderConfig, apply_architecture


def format_options(arch: str) -> str:
    """The --help text of the model options (under `arch`'s presets) and criterion options."""
    parser = argparse.ArgumentParser(
        prog=f"fairseq-train --user-dir xmoe --arch {arch} --criterion xmoe_masked_lm",
        add_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model_cfg = XMoEEncoderConfig()
    apply_architecture(model_cfg, arch)  # so that the defaults shown are the preset's values
    gen_parser_from_dataclass(parser.add_argument_group(f"model options (--arch {arch})"), model_cfg)
    gen_parser_from_dataclass(
        parser.add_argument_group("criterion options (--criterion xmoe_masked_lm)"), XMoEMaskedLmConfig()
    )
    return parser.format_help()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="xmoe_base", choices=sorted(ARCHITECTURES), help="architecture preset")
    args = parser.parse_args(argv)
    sys.stdout.write(format_options(args.arch))


if __name__ == "__main__":
    main()
