"""Evaluation: PSNR, SSIM, LPIPS, FVD and a Physics-IQ style score."""
