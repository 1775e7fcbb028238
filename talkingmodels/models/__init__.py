"""Plain-PyTorch image models whose pretrained weights ship as pip packages."""
