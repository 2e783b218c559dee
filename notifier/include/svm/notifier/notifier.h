// Umbrella header of svm::notifier: the mm model, interval notifiers and
// hmm_range_fault.
#pragma once

#include "svm/notifier/cpu_pte.h"
#include "svm/notifier/frame_pool.h"
#include "svm/notifier/hmm.h"
#include "svm/notifier/mm.h"
#include "svm/notifier/mmu_notifier.h"
